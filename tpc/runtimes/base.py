"""What a runtime offers tpc: load an artifact, run it on named numpy arrays, and run it teacher-forced."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tpc.errors import UsageError


class Runtime(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def load(cls, artifact: Path, forced: tuple[str, ...] = ()) -> Runtime:
        """Open the artifact. `forced`: output names to turn into inputs (teacher forcing)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, for inputs by name."""

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {}


def load_components(directory: str | Path, section: str, what: str) -> tuple[Any, dict[str, Callable]]:
    """An export's manifest and each component's `run`, in its target's runtime; the manifest must have `section`
    (`generation` for a VLM, `policy` for a policy), else one clear error naming `what` was expected."""
    from tpc.exporter import runtime_for
    from tpc.exporter.manifest import Manifest

    directory = Path(directory)
    manifest = Manifest.read(directory)
    if getattr(manifest, section) is None:
        family = manifest.model["family"]
        raise UsageError(f"'{directory}' is a {family} export, not {what} (tpc.json has no {section})")
    runtime = runtime_for(manifest.target)
    return manifest, {c.name: runtime.load(directory / c.artifact).run for c in manifest.components}
