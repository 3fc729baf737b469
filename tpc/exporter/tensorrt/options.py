"""The TensorRT target's options (light: `tpc export --help` reads them without loading the target)."""

from __future__ import annotations

from dataclasses import dataclass

from tpc.exporter.options import TargetOptions, option

SELECT_LOWERINGS = ("native", "plugin")


@dataclass(frozen=True)
class TensorRTOptions(TargetOptions):
    trt_select: str = option(
        "native",
        help="the select op's lowering: native = TopK + TopK + Gather, plugin = one TokenSelect node for tpc's "
        "CUDA plugin",
        choices=SELECT_LOWERINGS,
        cli="param",
    )
