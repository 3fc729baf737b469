"""Pruning methods: each one's light declaration in `tpc.methods.registry`, its tensor functions in its own module.

`REGISTRY` is the list of methods tpc knows; the CLI, `tpc methods` and the export pipeline read it instead of
branching on names. Importing this package (and listing or validating methods) does not import torch: the
method modules (`hiprune`, `divprune`, `fastv`, `catp`, `lvlm_csp`, `random`, `uniform`, `vla_pruner`, `none`)
load on first use, as attributes of this package or with `from tpc.methods import hiprune`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tpc.errors import unknown_name
from tpc.methods.base import Method, Param, PrefillMethod, VisionMethod, VisionSignals
from tpc.methods.registry import REGISTRY
from tpc.methods.schedule import PrefillSignals

_MODULES = ("catp", "divprune", "fastv", "hiprune", "lvlm_csp", "none", "random", "uniform", "vla_pruner")


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise unknown_name("method", name, REGISTRY, "see `tpc methods`")
    return REGISTRY[name]


def register(method: Method) -> None:
    """Add a method record (a research variant, a test-only schedule) to the registry every command reads."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method


def __getattr__(name: str) -> ModuleType:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "Method",
    "Param",
    "PrefillMethod",
    "PrefillSignals",
    "VisionMethod",
    "VisionSignals",
    "catp",
    "divprune",
    "fastv",
    "get_method",
    "hiprune",
    "lvlm_csp",
    "none",
    "random",
    "register",
    "uniform",
    "vla_pruner",
]
