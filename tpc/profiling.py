"""`tpc profile`: latency of an export in its runtime, optionally side by side with a baseline export.

With a baseline, the two artifacts are run alternately in one process (A, B, A, B, ...), so that both see the
same machine state and the speedup is a ratio measured in one run, not two numbers from different moments.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError
from tpc.exporter import runtime_for
from tpc.exporter.manifest import INPUTS_FILE, Manifest, read_samples
from tpc.runtimes import Runtime


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
    directory: str
    runtime: str
    timing: Timing
    baseline_directory: str | None = None
    baseline: Timing | None = None
    speedup: float | None = None
    machine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(directory: Path) -> tuple[Runtime, dict[str, np.ndarray], str]:
    manifest = Manifest.read(directory)
    runtime = runtime_for(manifest.target)
    return runtime.load(directory / manifest.artifact), read_samples(directory, INPUTS_FILE), runtime.name


def _timed(session: Runtime, inputs: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(inputs)
    return time.perf_counter() - start


def profile(directory: Path, runs: int = 50, warmup: int = 5, baseline: Path | None = None) -> ProfileReport:
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    session, inputs, runtime = _open(Path(directory))
    base = _open(Path(baseline)) if baseline is not None else None
    for _ in range(warmup):
        session.run(inputs)
        if base:
            base[0].run(base[1])
    times, base_times = [], []
    for _ in range(runs):
        times.append(_timed(session, inputs))
        if base:
            base_times.append(_timed(base[0], base[1]))
    report = ProfileReport(
        str(directory), runtime, Timing.of(times), machine=f"{platform.machine()} {platform.processor()}".strip()
    )
    if base:
        report.baseline_directory = str(baseline)
        report.baseline = Timing.of(base_times)
        report.speedup = report.baseline.median_ms / report.timing.median_ms
    return report
