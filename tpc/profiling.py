"""`tpc profile`: latency of an export in its runtime, optionally side by side with a baseline export.

A VLM export is timed per component, and as the time to first token (vision + prefill) per round.
With a baseline, the two artifacts are run alternately in one process (A, B, A, B, ...), so that both see the
same machine state and the speedup is a ratio measured in one run, not two numbers from different moments.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tpc.errors import UsageError
from tpc.exporter import runtime_for
from tpc.exporter.manifest import INPUTS_FILE, Manifest, read_samples


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = sorted(s * 1e3 for s in seconds)
        return cls(statistics.median(ms), ms[int(0.9 * (len(ms) - 1))], statistics.fmean(ms), ms[0], len(ms))


@dataclass
class ProfileReport:
    """`timing`: one call of the whole export (an encoder's graph; a VLM's vision + prefill, the time to first
    token). `components`: each graph alone (a VLM's decode is the per-token latency)."""

    directory: str
    runtime: str
    timing: Timing
    components: dict[str, Timing]
    baseline_directory: str | None = None
    baseline: Timing | None = None
    baseline_components: dict[str, Timing] | None = None
    speedup: float | None = None
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIRST_TOKEN = ("vision", "prefill")


@dataclass
class _Opened:
    """An export ready to time: one runnable per component, each with its first sample's inputs."""

    runs: dict[str, Callable[[], object]]
    runtime: str

    def headline(self) -> list[str]:
        names = [n for n in FIRST_TOKEN if n in self.runs]
        return names or list(self.runs)


def _open(directory: Path) -> _Opened:
    manifest = Manifest.read(directory)
    runtime = runtime_for(manifest.target)
    runs = {}
    for spec in manifest.components:
        session = runtime.load(directory / spec.artifact)
        inputs = read_samples(directory, spec.name, INPUTS_FILE)
        runs[spec.name] = functools.partial(session.run, inputs)
    return _Opened(runs, runtime.name)


def _time_round(opened: _Opened, times: dict[str, list[float]]) -> None:
    """One timed call of each component; the headline is the sum of its components' times in this round."""
    total = 0.0
    for name, run in opened.runs.items():
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        times.setdefault(name, []).append(elapsed)
        total += elapsed if name in opened.headline() else 0.0
    times.setdefault(HEADLINE, []).append(total)


HEADLINE = "__all__"


def profile(directory: Path, runs: int = 50, warmup: int = 5, baseline: Path | None = None) -> ProfileReport:
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    opened = _open(Path(directory))
    base = _open(Path(baseline)) if baseline is not None else None
    times: dict[str, list[float]] = {}
    base_times: dict[str, list[float]] = {}
    for round_number in range(warmup + runs):
        measured = round_number >= warmup
        _time_round(opened, times if measured else {})
        if base:
            _time_round(base, base_times if measured else {})
    report = ProfileReport(
        str(directory),
        opened.runtime,
        Timing.of(times.pop(HEADLINE)),
        {name: Timing.of(t) for name, t in times.items()},
        machine=f"{platform.machine()} {platform.processor()}".strip(),
    )
    if base:
        report.baseline_directory = str(baseline)
        report.baseline = Timing.of(base_times.pop(HEADLINE))
        report.baseline_components = {name: Timing.of(t) for name, t in base_times.items()}
        report.speedup = report.baseline.median_ms / report.timing.median_ms
    return report
