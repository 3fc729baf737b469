"""Graph passes on an `ExportedProgram`, run after `torch.export` and before a target serialises it."""

from __future__ import annotations

from torch.export import ExportedProgram

from tpc.ops.select import decompositions


def lower_tpc_ops(program: ExportedProgram, lowering: str = "flat") -> ExportedProgram:
    """Replace tpc's custom ops by their ATen decompositions (TopK + ascending TopK + Gather; no sort).

    Targets without a dedicated kernel for the op (ONNX Runtime, ExecuTorch portable kernels, TensorRT's native
    path) run this; `lowering`: `flat` (ONNX's one Gather on axis 0), `gather` (ExecuTorch: no reshape between
    XNNPACK islands) or `float32` (TensorRT: no float64, no reliance on TopK's tie order).
    """
    return program.run_decompositions(decompositions(lowering))
