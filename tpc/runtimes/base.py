"""What a runtime offers tpc: load an artifact, run it on named numpy arrays, and run it teacher-forced."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np


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
