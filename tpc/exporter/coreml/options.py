"""The Core ML target's options (light: `tpc export --help` reads them without loading the target)."""

from __future__ import annotations

from dataclasses import dataclass

from tpc.exporter.options import TargetOptions, option
from tpc.runtimes.coreml import COMPUTE_UNITS


@dataclass(frozen=True)
class CoreMLOptions(TargetOptions):
    compute_units: str = option(
        "all",
        help=f"Core ML compute units the model prefers: {', '.join(COMPUTE_UNITS)}",
        choices=COMPUTE_UNITS,
        kind="Core ML compute units",
    )
