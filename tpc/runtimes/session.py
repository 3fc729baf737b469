"""What every runtime module and loop shares without importing each other: the session protocol and the name of
the output every selecting graph has (and the input teacher forcing feeds)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

KEPT_INDICES = "kept_indices"


class Session(Protocol):
    """Something that runs one component: a runtime's loaded graph, or a staged step driving two of them."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
