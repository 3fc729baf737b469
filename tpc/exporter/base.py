"""What a target is: a name, the pip extra that brings its tools, and how it writes one artifact."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from tpc.errors import UsageError


class Target(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]  # artifact file suffix: a component `vision` becomes `vision{suffix}`
    extra: ClassVar[str]  # `pip install tpc[EXTRA]`
    requires: ClassVar[tuple[str, ...]]  # importable modules the target needs
    runtime: ClassVar[str]  # name in tpc.runtimes.RUNTIMES that runs the artifact

    def check_installed(self) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(
                f"target '{self.name}' needs {', '.join(missing)}, which is not installed; "
                f"install it with: pip install 'tpc[{self.extra}]' -c constraints.txt"
            )

    @abstractmethod
    def export(
        self,
        module: nn.Module,
        inputs: dict[str, Tensor],
        output_names: tuple[str, ...],
        path: Path,
    ) -> dict[str, Any]:
        """Write one component's artifact to `path`; return facts for the manifest (op counts, `versions`)."""
