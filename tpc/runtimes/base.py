"""What a runtime offers tpc: load an artifact, run it on named numpy arrays, and run it teacher-forced."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from tpc.errors import UsageError


@dataclass(frozen=True)
class Entry:
    """Which graph of an artifact to run, and its I/O names in order: a multi-method file (ExecuTorch) needs the
    method and a positional format the names; ONNX and Core ML files carry their own and ignore them."""

    method: str | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


ONLY_GRAPH = Entry()


class Session(Protocol):
    """Something that runs one component: a runtime's loaded graph, or a staged step driving two of them."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Runtime(ABC):
    name: ClassVar[str]
    # True: `load(forced=...)` cuts the artifact's graph to teacher-force it; False: the export writes a separate
    # teacher-forced artifact (`teacher_forced` in tpc.json) whose inputs end with `kept_indices`
    cuts_outputs: ClassVar[bool] = True

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


def load_components(directory: str | Path, section: str, what: str) -> tuple[Any, dict[str, Callable]]:
    """An export's manifest and each component's `run`, in its target's runtime; the manifest must have `section`
    (`generation` for a VLM, `policy` for a policy), else one clear error naming `what` was expected."""
    from tpc.exporter import runtime_for
    from tpc.exporter.manifest import Manifest

    directory = Path(directory)
    manifest = Manifest.read(directory)
    if getattr(manifest, section) is None:
        family = manifest.model["family"]
        raise UsageError(f"'{directory}' is a {family} export, not {what} (tpc.json has no {section})")
    runtime = runtime_for(manifest.target)
    return manifest, {c.name: open_component(runtime, directory, c).run for c in manifest.components}


KEPT_INDICES = "kept_indices"  # the output every selecting graph has, and the input teacher forcing feeds


def open_component(runtime: type[Runtime], directory: Path, spec: Any, teacher_forced: bool = False) -> Session:
    """Load one component of an export (`spec`: its manifest ComponentSpec) in `runtime`.

    `teacher_forced`: a session that takes `kept_indices` as an input, by cutting the artifact's graph where
    the runtime can, else from the teacher-forced artifact the export wrote beside it. A staged component (a
    policy step lowered as prefill + decode) opens both stages behind one step-shaped session.
    """
    if spec.stages:
        from tpc.runtimes.staged import StagedStep

        prefill, decode = spec.stages
        prefill_session = open_component(runtime, directory, prefill, teacher_forced)
        return StagedStep(prefill_session, open_component(runtime, directory, decode), spec)
    inputs, outputs = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
    entry = Entry(spec.method, inputs, outputs)
    if not teacher_forced:
        return runtime.load(directory / spec.artifact, entry)
    if runtime.cuts_outputs:
        return runtime.load(directory / spec.artifact, entry, forced=(KEPT_INDICES,))
    if spec.teacher_forced is None:
        raise UsageError(f"'{directory}' has no teacher-forced artifact for '{spec.name}'; re-export it")
    return runtime.load(directory / spec.teacher_forced, Entry(spec.method, (*inputs, KEPT_INDICES), outputs))
