"""Edge lowering and XNNPACK partitioning of an ExecuTorch program's methods (the `xnnpack_partition` pass).

The select op is lowered to ATen before partitioning (`lower_tpc_ops`: float64 ranking key -> TopK -> ascending
TopK -> gather). XNNPACK has no kernel for any of these, so they run as portable kernels between two delegate
islands; this lowering keeps them in one portable run. ONNX's flat gather (reshape + index_select) would cost
one more island per select here, because XNNPACK takes the float reshape as an island of its own.
`docs/executorch.md` has the measurement, and each component's `delegation` facts in tpc.json report it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from tpc.exporter.executorch.delegation import capture_reasons, delegation_report
from tpc.exporter.graph_pass import GraphPass, run_passes

BACKEND = "XnnpackBackend"


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


class XnnpackPartition(GraphPass[Any]):
    """Every method (name -> ExportedProgram) edge-lowered and XNNPACK-partitioned into one program manager;
    the partitioner's reasons for what it left on portable kernels are kept (`reasons`) for the report."""

    name = "xnnpack_partition"

    def __init__(self) -> None:
        self.methods: set[str] = set()
        self.reasons: dict[str, str] = {}

    def requires(self, programs: dict[str, torch.export.ExportedProgram]) -> None:
        if not programs:
            raise ValueError("no method to lower")

    def call(self, programs: dict[str, torch.export.ExportedProgram]) -> Any:
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

        self.methods = set(programs)
        with capture_reasons() as log, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower(
                programs,
                partitioner=[partitioner()],
                # tpc's graphs are checked for static shapes by their own contract; the edge IR validator rejects
                # ops (e.g. the float64 ranking key's full_like) that the portable kernels run fine
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
        self.reasons = log.reasons
        return edge

    def ensures(self, edge: Any) -> None:
        if set(edge.methods) != self.methods:
            raise RuntimeError(f"lowered methods {sorted(edge.methods)}, expected {sorted(self.methods)}")

    def reports(self, edge: Any) -> dict[str, dict[str, Any]]:
        """Each method's delegation report (islands, FLOPs share, why ops stayed portable)."""
        return {
            name: delegation_report(edge.exported_program(name).graph_module, self.reasons, BACKEND).to_dict()
            for name in sorted(self.methods)
        }


def lower(
    programs: dict[str, torch.export.ExportedProgram], target: str = "executorch"
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Edge-lower and XNNPACK-partition every method; returns the program manager and each method's report."""
    partition = XnnpackPartition()
    edge = run_passes([partition], programs, target)
    return edge, partition.reports(edge)
