"""Targets, one module each, in a registry; plus the export directory's manifest (`tpc.json`).

The package itself imports nothing heavy: `tpc.contract.manifest` (numpy and the standard library) is what the
runtimes read, and they must not pay for torch. The targets, which need torch, load on first use of `TARGETS`,
`PARAM_OPTIONS`, `get_target` or the base classes.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from tpc.errors import UsageError, unknown_name

if TYPE_CHECKING:
    from tpc.exporter.base import Target
    from tpc.runtimes.base import Runtime

# name -> (module, class): the order is the order `--help` and errors list them in
_TARGET_CLASSES = {
    "onnx": ("tpc.exporter.onnx", "OnnxTarget"),
    "tensorrt": ("tpc.exporter.tensorrt", "TensorRTTarget"),
    "executorch": ("tpc.exporter.executorch", "ExecuTorchTarget"),
    "coreml": ("tpc.exporter.coreml", "CoreMLTarget"),
}
TARGET_NAMES = tuple(_TARGET_CLASSES)


@functools.cache
def _targets() -> dict[str, type[Target]]:
    return {name: getattr(importlib.import_module(module), cls) for name, (module, cls) in _TARGET_CLASSES.items()}


def __getattr__(name: str) -> Any:
    if name == "TARGETS":
        return _targets()
    if name == "PARAM_OPTIONS":  # target options given as `--param NAME=VALUE` (TensorRT's select lowering)
        return frozenset(option for target in _targets().values() for option in target.param_options)
    if name in ("Artifact", "ExportPart", "Target"):
        return getattr(importlib.import_module("tpc.exporter.base"), name)
    raise AttributeError(f"module 'tpc.exporter' has no attribute '{name}'")


def get_target(name: str, **options: Any) -> Target:
    """The target `name`, configured with its options (e.g. Core ML's compute_units); one line if unknown."""
    if name not in _TARGET_CLASSES:
        raise unknown_name("target", name, TARGET_NAMES)
    target = _targets()[name]
    for option in options:
        if option not in target.options:
            accepted = ", ".join(target.options) or "none"
            raise UsageError(f"option '{option}' does not apply to target '{name}' (its options: {accepted})")
    return target(**options)


def runtime_for(target_name: str) -> type[Runtime]:
    """The runtime that runs a target's artifact; a clear error if the target's extra is not installed."""
    from tpc.runtimes import RUNTIMES

    target = get_target(target_name)
    target.check_installed()
    return RUNTIMES[target.runtime]


__all__ = [
    "PARAM_OPTIONS",
    "TARGETS",
    "TARGET_NAMES",
    "Artifact",
    "ExportPart",
    "Target",
    "get_target",
    "runtime_for",
]
