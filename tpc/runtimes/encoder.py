"""A pruned encoder export run in its target's runtime, with numpy only.

    encoder = Encoder.load("out/my-clip")                   # one graph: pixel_values -> kept_features, kept_indices
    kept_features, kept_indices = encoder(pixel_values)     # (B, K, D), (B, K) int64 ascending
    outputs = encoder.run(pixel_values)                     # the same, by output name

`pixel_values` is a numpy array of any float dtype or a torch tensor (`tpc.runtimes.inputs`), of the export's
static shape (tpc.json `components[0].inputs`); it is converted to the graph's dtype. NaN or infinite pixels give
a `NonFiniteInputWarning`, or with `strict=True` a UsageError.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc.runtimes.base import load_export
from tpc.runtimes.inputs import check_floats, resolve_strict

if TYPE_CHECKING:
    from tpc.contract.manifest import ComponentSpec

PIXELS = "pixel_values"
RunGraph = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class Encoder:
    """`run`: the graph's callable (inputs by name -> outputs by name). `spec`: its manifest ComponentSpec."""

    def __init__(self, run: RunGraph, spec: ComponentSpec, strict: bool = False) -> None:
        self._run = run
        self.spec = spec
        self.pixels = next(s for s in spec.inputs if s.name == PIXELS)
        self.output_names = [s.name for s in spec.outputs]
        self.strict = strict

    @classmethod
    def load(cls, directory: str | Path, strict: bool = False) -> Encoder:
        """Open an encoder export's graph in its target's runtime (a VLM or a policy export is one line naming
        the class that loads it). `strict`: NaN/inf pixel values raise instead of warning."""
        manifest, runs = load_export(directory, None)
        spec = manifest.components[0]
        return cls(runs[spec.name], spec, strict)

    def run(self, pixel_values: Any, strict: bool | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs by name (`kept_features`, `kept_indices`) for one batch of pixel values."""
        return self._outputs(pixel_values, strict)

    def __call__(self, pixel_values: Any, strict: bool | None = None) -> tuple[np.ndarray, ...]:
        """The outputs in the manifest's order: `(kept_features, kept_indices)`."""
        outputs = self._outputs(pixel_values, strict)
        return tuple(outputs[name] for name in self.output_names)

    def _outputs(self, pixel_values: Any, strict: bool | None) -> dict[str, np.ndarray]:
        layout = "batch, channels, height, width: the processor's normalised image"
        strict = resolve_strict(strict, self.strict)
        pixels = check_floats(pixel_values, PIXELS, self.pixels.shape, self.pixels.dtype, layout, strict, stacklevel=3)
        return self._run({PIXELS: pixels})
