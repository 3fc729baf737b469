"""Targets, one module or package each (`onnx`, `tensorrt/`, `executorch/`, `coreml`), in a registry.

The package itself imports nothing heavy; the targets, which need torch, load on first use of `TARGETS`,
`PARAM_OPTIONS`, `option_specs`, `get_target` or the base classes. Each target declares its options as a
`TargetOptions` dataclass (`Target.Options`); `option_specs` is what the CLI builds its flags and `--param`
names from.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from tpc.errors import unknown_name
from tpc.exporter.options import OptionSpec, TargetOptions

if TYPE_CHECKING:
    from tpc.exporter.base import Target

# name -> (module, class): the order is the order `--help` and errors list them in
_TARGET_CLASSES = {
    "onnx": ("tpc.exporter.onnx", "OnnxTarget"),
    "tensorrt": ("tpc.exporter.tensorrt.target", "TensorRTTarget"),
    "executorch": ("tpc.exporter.executorch.target", "ExecuTorchTarget"),
    "coreml": ("tpc.exporter.coreml", "CoreMLTarget"),
}
TARGET_NAMES = tuple(_TARGET_CLASSES)
# name -> (module, class) of the target's `Options`, in a module without torch, so that the CLI builds its flags
# without loading the targets (tests check each is the target's `Options`); a target not listed is loaded instead
_TARGET_OPTIONS = {
    "onnx": ("tpc.exporter.options", "TargetOptions"),
    "tensorrt": ("tpc.exporter.tensorrt.options", "TensorRTOptions"),
    "executorch": ("tpc.exporter.options", "TargetOptions"),
    "coreml": ("tpc.exporter.coreml.options", "CoreMLOptions"),
}


@functools.cache
def _target(name: str) -> type[Target]:
    module, cls = _TARGET_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def _targets() -> dict[str, type[Target]]:
    return {name: _target(name) for name in TARGET_NAMES}


def __getattr__(name: str) -> Any:
    if name == "TARGETS":
        return _targets()
    if name == "PARAM_OPTIONS":  # target options given as `--param NAME=VALUE` (TensorRT's select lowering)
        return frozenset(spec.name for specs in option_specs().values() for spec in specs if spec.cli == "param")
    if name in ("Artifact", "ExportPart", "Target"):
        return getattr(importlib.import_module("tpc.exporter.base"), name)
    raise AttributeError(f"module 'tpc.exporter' has no attribute '{name}'")


def target_options(name: str) -> type[TargetOptions]:
    """The `Options` dataclass of the target `name`, without loading the target where it is registered above."""
    if name in _TARGET_OPTIONS:
        module, cls = _TARGET_OPTIONS[name]
        return getattr(importlib.import_module(module), cls)
    return _target(name).Options


def option_specs() -> dict[str, tuple[OptionSpec, ...]]:
    """Each target's options (name, default, help, choices, CLI form), read from its `Options` dataclass; what
    the CLI shows and accepts. Loads only the targets whose options are not registered in a light module."""
    return {name: target_options(name).specs() for name in TARGET_NAMES}


def get_target(name: str, **options: Any) -> Target:
    """The target `name`, configured with its options (e.g. Core ML's compute_units, TensorRT's trt_select) as
    the CLI passes them (strings); one line if the target, an option or a value is unknown."""
    if name not in _TARGET_CLASSES:
        raise unknown_name("target", name, TARGET_NAMES)
    return _target(name)(**options)  # `Target.__init__` -> `Options.parse`, the one place options are checked


__all__ = [
    "PARAM_OPTIONS",
    "TARGETS",
    "TARGET_NAMES",
    "Artifact",
    "ExportPart",
    "OptionSpec",
    "Target",
    "TargetOptions",
    "get_target",
    "option_specs",
    "target_options",
]
