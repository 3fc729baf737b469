"""What a target is: a name, the pip extra that brings its tools, and how it writes a model's artifacts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tpc.errors import require


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


@dataclass
class Artifact:
    """Where a component landed: a file (relative to the export directory), the method inside it, and facts."""

    path: str
    method: str | None = None  # entry point inside a multi-method artifact (ExecuTorch); None: the file's only graph
    graph: dict[str, Any] = field(default_factory=dict)  # target facts for the manifest; `versions` is popped


class Target(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]  # artifact file suffix: a component `vision` becomes `vision{suffix}`
    extra: ClassVar[str]  # `pip install tpc[EXTRA]`
    requires: ClassVar[tuple[str, ...]]  # importable modules the target needs
    runtime: ClassVar[str]  # name in tpc.runtimes.RUNTIMES that runs the artifact
    options: ClassVar[dict[str, str]] = {}  # target option -> what it means (the CLI's --compute-units, ...)
    param_options: ClassVar[tuple[str, ...]] = ()  # options the CLI takes as --param NAME=VALUE
    # write a policy step as its prefill and decode stages (tpc.passes.policy_stages) instead of one unrolled graph
    lowers_policies_per_stage: ClassVar[bool] = False

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
