"""ExecuTorch target: torch.export -> tpc op lowering -> to_edge_transform_and_lower(XNNPACK) -> one `.pte`.

All of a model's components go into one program as separate methods (an encoder's graph is `forward`, the
method `executor_runner` runs by default; a VLM's are `vision`, `prefill`, `decode`; a policy's `warmup` and
`pruned`), as optimum-executorch packs VLMs: one file to ship, loaded once, with its weights in one place.

Passes (`ExecuTorchTarget.passes`, over the methods by name): `lower_tpc_ops` (gather, each method) ->
`xnnpack_partition` (`lowering`). The ExecuTorch runtime has no sort kernel, which is why the ascending
re-order is a TopK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tpc.contract.manifest import Manifest
from tpc.contract.names import SINGLE
from tpc.exporter.base import Artifact, ExportPart, LowerTpcOps, Target, export_program
from tpc.exporter.executorch.bundle import write_bundle
from tpc.exporter.executorch.lowering import XnnpackPartition
from tpc.exporter.graph_pass import ForEach, GraphPass, run_passes
from tpc.runtimes.executorch import ExecuTorchRuntime

PROGRAM_FILE = "model.pte"
SINGLE_METHOD = "forward"  # executor_runner and the benchmark apps run `forward` unless told otherwise


def method_name(component: str) -> str:
    """An encoder's one graph is `forward`; a VLM's or a policy's components keep their names."""
    return SINGLE_METHOD if component == SINGLE else component


class ExecuTorchTarget(Target):
    name = "executorch"
    suffix = ".pte"
    extra = "executorch"
    requires = ("executorch",)
    runtime = "executorch"
    # the unrolled step is action_dim decoders long, and XNNPACK's per-island work grows with the graph
    # (tiny-openvla FastV: 163 islands, 220 s to lower); its decode stage is lowered once instead
    lowers_policies_per_stage = True
    bundle = "an ExecuTorch benchmark bundle"

    def write_bundle(self, directory: Path, manifest: Manifest) -> None:
        write_bundle(directory, manifest)

    def passes(self) -> list[GraphPass[Any]]:
        """From the traced methods (name -> ExportedProgram) to the partitioned edge program manager, in order."""
        return [ForEach(LowerTpcOps("gather")), XnnpackPartition()]

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
        passes = self.passes()
        traced = {name: export_program(part.module, part.inputs) for name, part in methods.items()}
        edge = run_passes(passes, traced, self.name)
        reports = next(p for p in passes if isinstance(p, XnnpackPartition)).reports(edge)
        buffer = edge.to_executorch().buffer
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer)
        versions = ExecuTorchRuntime.versions()
        return {
            name: {"program_bytes": len(buffer), "delegation": reports[name], "versions": versions} for name in methods
        }
