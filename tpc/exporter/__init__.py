"""Targets, one module each, in a registry; plus the export directory's manifest (`tpc.json`)."""

from __future__ import annotations

from typing import Any

from tpc.errors import UsageError, unknown_name
from tpc.exporter.base import Artifact, ExportPart, Target
from tpc.exporter.coreml import CoreMLTarget
from tpc.exporter.executorch import ExecuTorchTarget
from tpc.exporter.onnx import OnnxTarget
from tpc.exporter.tensorrt import TensorRTTarget
from tpc.runtimes import RUNTIMES, Runtime

TARGETS: dict[str, type[Target]] = {t.name: t for t in (OnnxTarget, TensorRTTarget, ExecuTorchTarget, CoreMLTarget)}
# target options given as `--param NAME=VALUE` (TensorRT's select lowering) rather than as flags of their own
PARAM_OPTIONS = frozenset(name for target in TARGETS.values() for name in target.param_options)


def get_target(name: str, **options: Any) -> Target:
    """The target `name`, configured with its options (e.g. Core ML's compute_units); one line if unknown."""
    if name not in TARGETS:
        raise unknown_name("target", name, TARGETS)
    target = TARGETS[name]
    for option in options:
        if option not in target.options:
            accepted = ", ".join(target.options) or "none"
            raise UsageError(f"option '{option}' does not apply to target '{name}' (its options: {accepted})")
    return target(**options)


def runtime_for(target_name: str) -> type[Runtime]:
    """The runtime that runs a target's artifact; a clear error if the target's extra is not installed."""
    target = get_target(target_name)
    target.check_installed()
    return RUNTIMES[target.runtime]


__all__ = ["PARAM_OPTIONS", "TARGETS", "Artifact", "ExportPart", "Target", "get_target", "runtime_for"]
