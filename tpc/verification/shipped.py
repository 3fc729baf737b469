"""The export's own files, checked before anything runs: every file matches the sha256 recorded at export,
tpc.json's inputs/outputs equal each artifact's own declaration (read by its runtime), and the samples have the
manifest's names, shapes and dtypes (kept indices in range and ascending within each run of the schedule)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tpc.contract.manifest import (
    EXPECTED_FILE,
    INPUTS_FILE,
    ComponentSpec,
    Manifest,
    changed_files,
    inside,
    read_npz,
    samples_dir,
)
from tpc.contract.names import KEPT_INDICES
from tpc.contract.report import ShippedCheck
from tpc.errors import UsageError
from tpc.kinds.base import kind_of
from tpc.kinds.checks import array_problems
from tpc.runtimes.base import RUNTIME_CLASSES, runtime_named


@dataclass
class Shipped:
    """What `check_shipped` read: the checks, and every sample file's arrays by its path in the export."""

    checks: list[ShippedCheck] = field(default_factory=list)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def add(self, check: str, problems: list[str]) -> bool:
        self.checks.append(
            ShippedCheck(check, not problems, "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
        )
        return not problems


def sample_file(directory: Path, component: str, name: str) -> str:
    """A component's sample file, relative to the export directory."""
    return samples_dir(directory, component).relative_to(directory).as_posix() + "/" + name


def sample_files(directory: Path, manifest: Manifest) -> list[str]:
    """Every sample file the manifest implies (relative paths)."""
    files = []
    for component in manifest.components:
        for spec in [component, *component.stages]:
            files += [sample_file(directory, spec.name, INPUTS_FILE), sample_file(directory, spec.name, EXPECTED_FILE)]
    return files + kind_of(manifest).sample_files(manifest)


def check_shipped(directory: Path, manifest: Manifest, runtime: str) -> Shipped:
    """Hashes, then (only if every file is as exported) the manifest against the artifacts and the samples'
    structure. Missing or unreadable files raise UsageError."""
    shipped = Shipped()
    for relative in manifest.named_files():
        if not inside(directory, relative, "artifact").exists():
            raise UsageError(f"'{directory / relative}' is missing: the export is incomplete (re-export it)")
    for relative in sample_files(directory, manifest):
        shipped.samples[relative] = read_npz(directory, relative)
    changed, missing, added = changed_files(directory, manifest)
    if missing:
        raise UsageError(f"'{directory}' lacks {', '.join(missing[:4])}, recorded at export: the export is incomplete")
    recorded = set(manifest.files)
    unrecorded = [
        relative
        for relative in [*manifest.named_files(), *sample_files(directory, manifest)]
        if relative not in recorded and not any(name.startswith(relative.rstrip("/") + "/") for name in recorded)
    ]
    problems = (
        [f"{name} changed since export" for name in changed]
        + [f"{name} has no recorded hash" for name in unrecorded]
        + [f"{name} was added since export" for name in added if name not in unrecorded]
    )
    if not shipped.add(f"{len(recorded)} files match the sha256 recorded in tpc.json", problems):
        return shipped  # nothing else is read from files that are not what the export wrote
    for component in manifest.components:
        for spec in component.methods:
            shipped.add(f"tpc.json I/O = {_where(spec)}", _io_problems(directory, spec, runtime, forced=False))
            if spec.teacher_forced is not None:
                check = f"tpc.json I/O = {spec.teacher_forced}" + (f" method {spec.method}" if spec.method else "")
                shipped.add(check, _io_problems(directory, spec, runtime, forced=True))
    for component in manifest.components:
        for spec in [component, *component.stages]:
            for name, tensors in ((INPUTS_FILE, spec.inputs), (EXPECTED_FILE, spec.outputs)):
                relative = sample_file(directory, spec.name, name)
                problems = array_problems(shipped.samples[relative], {t.name: (t.shape, t.dtype) for t in tensors})
                if name == EXPECTED_FILE and KEPT_INDICES in shipped.samples[relative] and not problems:
                    kept = shipped.samples[relative][KEPT_INDICES]
                    problems += kept_problems(kept, index_bound(manifest), manifest.tokens.get("kept_runs"))
                shipped.add(f"{relative}: names, shapes, dtypes as tpc.json", problems)
    return shipped


def index_bound(manifest: Manifest) -> int:
    """Kept indices lie in [0, this): every visual token (and prefix token) a graph chooses among."""
    return int(manifest.tokens["before"]) + int(manifest.tokens.get("prefix_tokens", 0))


def kept_problems(kept: np.ndarray, bound: int, runs: list[int] | None = None) -> list[str]:
    """Kept indices must be integers in [0, bound), strictly ascending along the last axis within each run (one
    run per prune transition of the method's schedule; `runs`: their widths when there are several)."""
    if kept.dtype.kind not in "iu":
        return [f"kept_indices are {kept.dtype}, not integers"]
    if kept.size and (kept.min() < 0 or kept.max() >= bound):
        return [f"kept_indices out of range [0, {bound}) (min {kept.min()}, max {kept.max()})"]
    # the runs are the decoder's selections; a graph selecting once (the vision graph of a VLM) has one run
    widths = runs if runs and sum(runs) == kept.shape[-1] else [kept.shape[-1]]
    edges = np.cumsum([0, *widths])
    for low, high in itertools.pairwise(edges):
        if high - low > 1 and not np.all(np.diff(kept[..., low:high], axis=-1) > 0):
            return ["kept_indices are not strictly ascending" + (f" in columns {low}..{high - 1}" if runs else "")]
    return []


def _where(spec: ComponentSpec) -> str:
    return spec.artifact + (f" method {spec.method}" if spec.method else "")


def _io_problems(directory: Path, spec: ComponentSpec, runtime: str, forced: bool) -> list[str]:
    """Differences between the manifest's I/O for `spec` and the artifact's own declaration of it."""
    if forced:
        assert spec.teacher_forced is not None, "only a spec with a teacher-forced artifact is checked forced"
        relative = spec.teacher_forced
    else:
        relative = spec.artifact
    path = inside(directory, relative, "artifact")
    want_inputs = {t.name: (list(t.shape), t.dtype) for t in spec.inputs}
    if forced:
        kept = next((t for t in spec.outputs if t.name == KEPT_INDICES), None)
        if kept is not None:
            want_inputs[KEPT_INDICES] = (list(kept.shape), kept.dtype)
    want_outputs = {t.name: (list(t.shape), t.dtype) for t in spec.outputs}
    if runtime not in RUNTIME_CLASSES:
        return []
    try:
        declared = runtime_named(runtime).artifact_io(path, spec.method, want_inputs, want_outputs)
    except UsageError:
        raise
    except Exception as err:  # a parser's own error on a file that is not what it claims
        raise UsageError(f"'{path}' cannot be read as a {runtime} artifact ({type(err).__name__}: {err})") from None
    if declared is None:
        return []
    got_inputs, got_outputs = declared
    problems = []
    for kind, want, got in (("input", want_inputs, got_inputs), ("output", want_outputs, got_outputs)):
        for name in sorted(set(want) | set(got)):
            if name not in got:
                problems.append(f"{kind} {name} is in tpc.json, not in {relative}")
            elif name not in want:
                problems.append(f"{kind} {name} is in {relative}, not in tpc.json")
            elif got[name] != want[name]:
                (gs, gd), (ws, wd) = got[name], want[name]
                problems.append(f"{kind} {name}: tpc.json says {wd}{ws}, {relative} has {gd}{gs}")
    return problems
