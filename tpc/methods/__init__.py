"""Pruning methods: one module per method, each exposing its tensor functions and a `METHOD` record.

`REGISTRY` is the list of methods tpc knows; the CLI, `tpc methods` and the export pipeline read it instead of
branching on names.
"""

from __future__ import annotations

from tpc.errors import unknown_name
from tpc.methods import divprune, fastv, hiprune, none, random, uniform, vla_pruner
from tpc.methods.base import Method, Param, PrefillMethod, PrefillSignals, VisionMethod, VisionSignals

REGISTRY: dict[str, Method] = {
    m.METHOD.name: m.METHOD for m in (hiprune, divprune, random, uniform, fastv, vla_pruner, none)
}


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise unknown_name("method", name, REGISTRY, "see `tpc methods`")
    return REGISTRY[name]


__all__ = [
    "REGISTRY",
    "Method",
    "Param",
    "PrefillMethod",
    "PrefillSignals",
    "VisionMethod",
    "VisionSignals",
    "divprune",
    "fastv",
    "get_method",
    "hiprune",
    "random",
    "uniform",
    "vla_pruner",
]
