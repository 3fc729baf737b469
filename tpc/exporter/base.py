"""What a target is: a name, the pip extra that brings its tools, and how it writes a model's artifacts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tpc.contract.manifest import Manifest
from tpc.errors import require
from tpc.exporter.graph_pass import GraphPass
from tpc.exporter.options import OptionSpec, TargetOptions, option
from tpc.ops.lowering import lower_tpc_ops

__all__ = [
    "Artifact",
    "ExportPart",
    "LowerTpcOps",
    "OptionSpec",
    "Target",
    "TargetOptions",
    "export_program",
    "option",
    "tpc_op_nodes",
]


@dataclass
class ExportPart:
    """One graph to export: the eager module, its example inputs by name (static shapes), its output names."""

    module: nn.Module
    inputs: dict[str, Tensor]
    output_names: tuple[str, ...]


def export_program(module: nn.Module, inputs: dict[str, Tensor]) -> torch.export.ExportedProgram:
    """`torch.export` as every target runs it: non-strict, no autograd, even when called under inference mode
    (inference tensors cannot be traced). Inputs get row-major strides: a numpy array with a new axis has a
    zero stride there, which the traced input would keep and ExecuTorch's memory planner rejects."""
    args = tuple(tensor.clone(memory_format=torch.contiguous_format) for tensor in inputs.values())
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(module, args=args, strict=False)


def tpc_op_nodes(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the nodes that still call one of tpc's custom ops (`torch.ops.tpc.*`)."""
    return [
        node.name
        for node in program.graph_module.graph.nodes
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "tpc"
    ]


class LowerTpcOps(GraphPass[torch.export.ExportedProgram]):
    """tpc's custom ops -> their ATen decomposition (`tpc.ops.lowering.lower_tpc_ops`), in the target's form:
    `flat` (ONNX), `gather` (ExecuTorch), `float32` (TensorRT's native select). Ensures none is left."""

    name = "lower_tpc_ops"

    def __init__(self, lowering: str = "flat") -> None:
        self.lowering = lowering

    def call(self, program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
        return lower_tpc_ops(program, lowering=self.lowering)

    def ensures(self, program: torch.export.ExportedProgram) -> None:
        if left := tpc_op_nodes(program):
            raise RuntimeError(f"tpc ops remain after the '{self.lowering}' lowering: {', '.join(left)}")


@dataclass
class Artifact:
    """Where a component landed: a file (relative to the export directory), the method inside it, and facts."""

    path: str
    method: str | None = None  # entry point inside a multi-method artifact (ExecuTorch); None: the file's only graph
    graph: dict[str, Any] = field(default_factory=dict)  # target facts for the manifest; `versions` is popped


class Target(ABC):
    """A target: its artifact format, the extra and runtime it needs, its options (`Options`, a `TargetOptions`
    dataclass the CLI builds its flags from) and its graph passes (`passes`, run in order by `run_passes`)."""

    name: ClassVar[str]
    suffix: ClassVar[str]  # artifact file suffix: a component `vision` becomes `vision{suffix}`
    extra: ClassVar[str]  # `pip install tpc[EXTRA]`
    requires: ClassVar[tuple[str, ...]]  # importable modules the target needs
    runtime: ClassVar[str]  # name in tpc.runtimes.RUNTIMES that runs the artifact
    Options: ClassVar[type[TargetOptions]] = TargetOptions  # the target's settings (none by default)
    # write a policy step as its prefill and decode stages (tpc.passes.policy_stages) instead of one unrolled graph
    lowers_policies_per_stage: ClassVar[bool] = False
    # what `--bundle` writes for this target (None: the target has no bundle): a phone benchmark bundle
    bundle: ClassVar[str | None] = None

    def __init__(self, *values: Any, **named: Any) -> None:
        """The target with its options: one `self.Options` instance, or values (strings, as the CLI passes them)
        by position in field order or by name, checked by `Options.parse` (one UsageError line if invalid)."""
        if len(values) == 1 and not named and isinstance(values[0], TargetOptions):
            if not isinstance(values[0], self.Options):
                raise TypeError(f"target '{self.name}' takes {self.Options.__name__}, not {type(values[0]).__name__}")
            self.options: TargetOptions = values[0]
            return
        names = [spec.name for spec in self.Options.specs()]
        if len(values) > len(names):
            raise TypeError(f"target '{self.name}' takes {len(names)} option(s), got {len(values)}")
        self.options = self.Options.parse(self.name, {**dict(zip(names, values, strict=False)), **named})

    def write_bundle(self, directory: Path, manifest: Manifest) -> None:
        """Write `bundle` into the staged export `directory` (only targets that declare one)."""
        raise NotImplementedError(f"target '{self.name}' has no bundle")

    def check_installed(self) -> None:
        require(f"target '{self.name}'", self.requires, self.extra)

    @abstractmethod
    def export(
        self,
        module: nn.Module,
        inputs: dict[str, Tensor],
        output_names: tuple[str, ...],
        path: Path,
    ) -> dict[str, Any]:
        """Write one component's artifact to `path`; return facts for the manifest (op counts, `versions`)."""

    def export_components(self, parts: dict[str, ExportPart], directory: Path, root: Path) -> dict[str, Artifact]:
        """Write every component under `directory` (inside the export directory `root`): one file each.

        Targets whose format holds several graphs in one file (ExecuTorch methods) override this.
        """
        artifacts = {}
        for name, part in parts.items():
            path = directory / f"{name}{self.suffix}"
            graph = self.export(part.module, part.inputs, part.output_names, path)
            artifacts[name] = Artifact(str(path.relative_to(root)), None, graph)
        return artifacts
