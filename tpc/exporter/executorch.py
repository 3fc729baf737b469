"""ExecuTorch target: torch.export -> tpc op lowering -> to_edge_transform_and_lower(XNNPACK) -> one `.pte`.

All of a model's components go into one program as separate methods (an encoder's graph is `forward`, the
method `executor_runner` runs by default; a VLM's are `vision`, `prefill`, `decode`; a policy's `warmup` and
`pruned`), as optimum-executorch packs VLMs: one file to ship, loaded once, with its weights in one place.

The select op is lowered to ATen before partitioning (`lower_tpc_ops`: float64 ranking key -> TopK -> ascending
TopK -> gather). XNNPACK has no kernel for any of these, so they run as portable kernels between two delegate
islands; this lowering keeps them in one portable run. ONNX's flat gather (reshape + index_select) would cost
one more island per select here, because XNNPACK takes the float reshape as an island of its own.
`docs/executorch.md` has the measurement, and each component's `delegation` facts in tpc.json report it.
The ExecuTorch runtime has no sort kernel, which is why the ascending re-order is a TopK.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tpc.exporter.base import Artifact, ExportPart, Target, export_program
from tpc.exporter.delegation import capture_reasons, delegation_report
from tpc.ops.lowering import lower_tpc_ops
from tpc.pipeline import SINGLE
from tpc.runtimes.executorch import ExecuTorchRuntime

PROGRAM_FILE = "model.pte"
SINGLE_METHOD = "forward"  # executor_runner and the benchmark apps run `forward` unless told otherwise
BACKEND = "XnnpackBackend"


def method_name(component: str) -> str:
    """An encoder's one graph is `forward`; a VLM's or a policy's components keep their names."""
    return SINGLE_METHOD if component == SINGLE else component


def exported_program(part: ExportPart) -> torch.export.ExportedProgram:
    return lower_tpc_ops(export_program(part.module, part.inputs), lowering="gather")


def partitioner() -> Any:
    """XNNPACK's partitioner, minus one silent change of math: executorch 1.4.1's XNNPACK GELU ignores
    `approximate="tanh"` and computes the exact GELU (SigLIP's `gelu_pytorch_tanh` then drifted by 8e-4 from
    eager in tests/test_executorch.py). Such nodes stay on the portable kernel, which honours it."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import why
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ExactGeluOnly(GeluConfig):
        def check_constraints(self, node: torch.fx.Node, ep: Any) -> bool:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approximate != "none":
                why(node, reason=f"XNNPACK's GELU ignores approximate='{approximate}' (exact GELU only)")
                return False
            return super().check_constraints(node, ep)

    configs = [ExactGeluOnly if config is GeluConfig else config for config in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)


def lower(programs: dict[str, torch.export.ExportedProgram]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Edge-lower and XNNPACK-partition every method; returns the program manager and each method's report."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with capture_reasons() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(
            programs,
            partitioner=[partitioner()],
            # tpc's graphs are checked for static shapes by their own contract; the edge IR validator rejects
            # ops (e.g. the float64 ranking key's full_like) that the portable kernels run fine
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    reports = {
        name: delegation_report(edge.exported_program(name).graph_module, log.reasons, BACKEND).to_dict()
        for name in programs
    }
    return edge, reports


class ExecuTorchTarget(Target):
    name = "executorch"
    suffix = ".pte"
    extra = "executorch"
    requires = ("executorch",)
    runtime = "executorch"
    # the unrolled step is action_dim decoders long, and XNNPACK's per-island work grows with the graph
    # (tiny-openvla FastV: 163 islands, 220 s to lower); its decode stage is lowered once instead
    lowers_policies_per_stage = True

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        """One graph as the `forward` method of the program at `path`."""
        return self.write_program({SINGLE_METHOD: ExportPart(module, inputs, output_names)}, path)[SINGLE_METHOD]

    def export_components(self, parts: dict[str, ExportPart], directory: Path, root: Path) -> dict[str, Artifact]:
        path = directory / PROGRAM_FILE
        facts = self.write_program({method_name(name): part for name, part in parts.items()}, path)
        relative = str(path.relative_to(root))
        return {name: Artifact(relative, method_name(name), facts[method_name(name)]) for name in parts}

    def write_program(self, methods: dict[str, ExportPart], path: Path) -> dict[str, dict[str, Any]]:
        """Lower every method into one program at `path`; each method's facts for the manifest."""
        edge, reports = lower({name: exported_program(part) for name, part in methods.items()})
        buffer = edge.to_executorch().buffer
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer)
        versions = ExecuTorchRuntime.versions()
        return {
            name: {"program_bytes": len(buffer), "delegation": reports[name], "versions": versions} for name in methods
        }
