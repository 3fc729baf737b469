"""What a runtime offers tpc: load an artifact, run it on named numpy arrays, and run it teacher-forced."""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tpc.contract.manifest import ComponentSpec, Manifest, inside
from tpc.contract.names import KEPT_INDICES, Session
from tpc.errors import UsageError, require
from tpc.runtimes.staged import StagedStep


@dataclass(frozen=True)
class Entry:
    """Which graph of an artifact to run, and its I/O names in order: a multi-method file (ExecuTorch) needs the
    method and a positional format the names; ONNX and Core ML files carry their own and ignore them."""

    method: str | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


ONLY_GRAPH = Entry()
TensorIO = dict[str, tuple[list[Any], str]]  # name -> (shape, numpy dtype name), as tpc.json records I/O


class Runtime(ABC):
    name: ClassVar[str]
    # True: `load(forced=...)` cuts the artifact's graph to teacher-force it; False: the export writes a separate
    # teacher-forced artifact (`teacher_forced` in tpc.json) whose inputs end with `kept_indices`
    cuts_outputs: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules `load` needs
    extra: ClassVar[str] = ""  # the pip extra that installs them

    @classmethod
    def check_installed(cls) -> None:
        """One line naming the extra to install when a module this runtime needs is missing."""
        require(f"the {cls.name} runtime", cls.requires, cls.extra)

    @classmethod
    @abstractmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> Runtime:
        """Open `entry` of the artifact. `forced`: output names to turn into inputs (teacher forcing; only
        runtimes that `cuts_outputs`)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name, for inputs by name."""

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {}

    @classmethod
    def artifact_io(
        cls, path: Path, method: str | None, want_inputs: TensorIO, want_outputs: TensorIO
    ) -> tuple[TensorIO, TensorIO] | None:
        """The artifact's own declaration of its (or `method`'s) inputs and outputs, name -> (shape, numpy dtype),
        read without running it, for `tpc verify` to compare with tpc.json. `want_*`: what tpc.json says, for
        formats that lack names (ExecuTorch: positions) or types (Core ML: no int64). None: nothing to read."""
        return None


# target (tpc.json `target`) -> the runtime that runs its artifacts; tpc.exporter's targets say the same
# (`Target.runtime`, tested), but importing them would import torch, which a runtime never needs
TARGET_RUNTIMES = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "executorch": "executorch", "coreml": "coreml"}
# what each kind of export is, by the manifest section it has, and the class that runs it
KINDS = {"generation": ("a VLM", "tpc.runtimes.VLM"), "policy": ("a policy", "tpc.runtimes.policy.Policy")}
ENCODER = ("an encoder", "tpc.runtimes.Encoder")


# runtime name -> the module and class that implement it, imported when used (each imports this module)
RUNTIME_CLASSES = {
    "onnxruntime": ("tpc.runtimes.onnxruntime", "OnnxRuntime"),
    "tensorrt": ("tpc.runtimes.tensorrt", "TensorRTRuntime"),
    "executorch": ("tpc.runtimes.executorch", "ExecuTorchRuntime"),
    "coreml": ("tpc.runtimes.coreml", "CoreMLRuntime"),
}


def runtime_named(name: str) -> type[Runtime]:
    module, cls = RUNTIME_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def runtime_of(manifest: Manifest) -> type[Runtime]:
    """The runtime an export records (one written before it was recorded: its target's), checked installed (one
    line naming the extra otherwise)."""
    name = manifest.runtime or TARGET_RUNTIMES.get(manifest.target)
    if manifest.runtime and manifest.target in TARGET_RUNTIMES and TARGET_RUNTIMES[manifest.target] != name:
        raise UsageError(
            f"tpc.json records the runtime '{name}' for a {manifest.target} export, whose artifacts run in "
            f"{TARGET_RUNTIMES[manifest.target]}; the manifest was edited (re-export it)"
        )
    if name not in RUNTIME_CLASSES:
        what = f"the runtime '{manifest.runtime}'" if manifest.runtime else f"the target '{manifest.target}'"
        raise UsageError(f"tpc.json names {what}, which this tpc cannot run; re-export it")
    runtime = runtime_named(name)
    runtime.check_installed()
    return runtime


RunComponent = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # a component's `run`: inputs -> outputs


def load_export(directory: str | Path, section: str | None) -> tuple[Manifest, dict[str, RunComponent]]:
    """An export's manifest and each component's `run`, in its target's runtime. `section`: the manifest section
    the kind of export has (`generation` for a VLM, `policy` for a policy, None for an encoder); an export of
    another kind is one line naming the class that loads it."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    have = next((name for name in KINDS if getattr(manifest, name, None) is not None), None)
    if have != section:
        what = KINDS[section][0] if section else ENCODER[0]
        kind, loader = KINDS[have] if have else ENCODER
        raise UsageError(f"'{directory}' is {kind} export, not {what}: load it with {loader}.load")
    runtime = runtime_of(manifest)
    return manifest, {c.name: open_component(runtime, directory, c).run for c in manifest.components}


def artifact_path(artifact: str | Path, what: str, directory: bool = False) -> Path:
    """`artifact` if it exists as a non-empty file (a directory for `directory` formats such as `.mlpackage`),
    else one UsageError line saying to re-export."""
    path = Path(artifact)
    if not path.exists():
        raise UsageError(f"'{path}' does not exist: the export is incomplete; re-export it")
    if directory and not path.is_dir():
        raise UsageError(f"'{path}' is not a valid {what} (not a directory); re-export it")
    if not directory:
        if not path.is_file():
            raise UsageError(f"'{path}' is not a valid {what} (not a file); re-export it")
        if path.stat().st_size == 0:
            raise UsageError(f"'{path}' is not a valid {what} (the file is empty); re-export it")
    return path


def invalid_artifact(path: str | Path, what: str, error: BaseException | str) -> UsageError:
    """The one line for an artifact its runtime refuses: its first line of reason, shortened."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "] : " in reason:  # onnxruntime's "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : ..." prefix
        reason = reason.rsplit(" : ", 1)[-1]
    if reason.startswith("Load model from ") and " failed:" in reason:  # ... and the path we print already
        reason = reason.split(" failed:", 1)[1].strip()
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return UsageError(f"'{path}' is not a valid {what} ({reason}); re-export it")


def open_component(
    runtime: type[Runtime], directory: Path, spec: ComponentSpec, teacher_forced: bool = False
) -> Session:
    """Load one component of an export (`spec`: its manifest ComponentSpec) in `runtime`.

    `teacher_forced`: a session that takes `kept_indices` as an input, by cutting the artifact's graph where
    the runtime can, else from the teacher-forced artifact the export wrote beside it. A staged component (a
    policy step lowered as prefill + decode) opens both stages behind one step-shaped session.
    """
    if spec.stages:
        prefill, decode = spec.stages
        prefill_session = open_component(runtime, directory, prefill, teacher_forced)
        return StagedStep(prefill_session, open_component(runtime, directory, decode), spec)
    inputs, outputs = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
    entry = Entry(spec.method, inputs, outputs)
    if not teacher_forced:
        return runtime.load(inside(directory, spec.artifact, "artifact"), entry)
    if runtime.cuts_outputs:
        return runtime.load(inside(directory, spec.artifact, "artifact"), entry, forced=(KEPT_INDICES,))
    if spec.teacher_forced is None:
        raise UsageError(f"'{directory}' has no teacher-forced artifact for '{spec.name}'; re-export it")
    forced_path = inside(directory, spec.teacher_forced, "teacher_forced artifact")
    return runtime.load(forced_path, Entry(spec.method, (*inputs, KEPT_INDICES), outputs))
