"""Targets, one module each, in a registry; plus the export directory's manifest (`tpc.json`)."""

from __future__ import annotations

from tpc.errors import UsageError, unknown_name
from tpc.exporter.base import Target
from tpc.exporter.onnx import OnnxTarget
from tpc.runtimes import RUNTIMES, Runtime

TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(),)}
# Named in the product's CLI, not built yet: saying so beats "unknown target".
PLANNED_TARGETS = ("tensorrt", "executorch", "coreml")


def get_target(name: str) -> Target:
    if name in PLANNED_TARGETS:
        raise UsageError(
            f"target '{name}' is not available in this version of tpc yet; available: {', '.join(TARGETS)}"
        )
    if name not in TARGETS:
        raise unknown_name("target", name, [*TARGETS, *PLANNED_TARGETS])
    return TARGETS[name]


def runtime_for(target_name: str) -> type[Runtime]:
    """The runtime that runs a target's artifact; a clear error if the target's extra is not installed."""
    target = get_target(target_name)
    target.check_installed()
    return RUNTIMES[target.runtime]


__all__ = ["TARGETS", "Target", "get_target", "runtime_for"]
