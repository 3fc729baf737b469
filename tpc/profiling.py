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

from tpc.contract.manifest import INPUTS_FILE, Manifest, read_samples
from tpc.errors import UsageError
from tpc.kinds import record_of
from tpc.runtimes.base import open_component, runtime_of


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


class TimedExport:
    """An export ready to time: each component with its first sample's inputs, and the times recorded so far.

    The headline of a round is what one call of the whole export costs: an encoder's graph, a VLM's
    vision + prefill (the time to first token) summed within the round, or a policy's (pruned) control step.
    """

    def __init__(self, directory: Path) -> None:
        manifest = Manifest.read(directory)
        self.manifest = manifest
        runtime = runtime_of(manifest)
        self.runtime = runtime.name
        self.runs: dict[str, Callable[[], object]] = {}
        for spec in manifest.components:
            session = open_component(runtime, directory, spec)
            self.runs[spec.name] = functools.partial(session.run, read_samples(directory, spec.name, INPUTS_FILE))
        self.headline_parts = list(record_of(manifest).headline([spec.name for spec in manifest.components]))
        self.times: dict[str, list[float]] = {name: [] for name in self.runs}
        self.headline: list[float] = []

    def run_round(self, record: bool = True) -> None:
        """One timed call of each component."""
        total = 0.0
        for name, run in self.runs.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if record:
                self.times[name].append(elapsed)
            total += elapsed if name in self.headline_parts else 0.0
        if record:
            self.headline.append(total)

    def timings(self) -> tuple[Timing, dict[str, Timing]]:
        return Timing.of(self.headline), {name: Timing.of(t) for name, t in self.times.items()}


MAX_RUNS, MAX_WARMUP = 100_000, 10_000  # documented caps: a median over more runs says nothing new


def input_layout(manifest: Manifest) -> dict[str, Any]:
    """What a caller feeds the export: the model, the batch, and the entry inputs' shapes and dtypes (an encoder's
    pixels; a VLM's pixels and prompt layout; a policy's image and prompt)."""
    first = manifest.components[0]
    layout: dict[str, Any] = {
        "model": (manifest.model.get("path"), manifest.model.get("model_type")),
        "batch": manifest.batch,
        "inputs": [(spec.name, spec.shape, spec.dtype) for spec in first.inputs if spec.name == "pixel_values"],
    }
    section = record_of(manifest).section
    protocols = {"generation": manifest.generation, "policy": manifest.policy}
    protocol = protocols[section] if section is not None else None
    if protocol is not None:  # a VLM's or a policy's static prompt
        prompt = protocol.prompt
        layout["prompt"] = {
            "text_tokens": prompt.text_tokens,
            "images": len(prompt.starts),
            "image_tokens": prompt.image_tokens,
            "length": prompt.length,
        }
    return layout


def check_comparable(export: Manifest, baseline: Manifest, where: Path) -> None:
    """A speedup is a ratio of two runs of the same model on the same inputs; anything else is refused."""
    mine, theirs = input_layout(export), input_layout(baseline)
    for key, label in (("model", "model"), ("batch", "batch"), ("inputs", "input shapes"), ("prompt", "prompt")):
        if mine.get(key) != theirs.get(key):
            raise UsageError(
                f"--baseline '{where}' has another {label} ({theirs.get(key)} vs {mine.get(key)}); a baseline must be "
                "the same model with the same inputs (export it with --method none and the same options)"
            )


def profile(directory: Path, runs: int = 50, warmup: int = 5, baseline: Path | None = None) -> ProfileReport:
    if not 1 <= runs <= MAX_RUNS or not 0 <= warmup <= MAX_WARMUP:
        raise UsageError(f"--runs must be in 1..{MAX_RUNS} and --warmup in 0..{MAX_WARMUP}, got {runs} and {warmup}")
    timed = TimedExport(Path(directory))
    base = None
    if baseline is not None:
        base = TimedExport(Path(baseline))
        check_comparable(timed.manifest, base.manifest, Path(baseline))
    for round_number in range(warmup + runs):
        measured = round_number >= warmup
        timed.run_round(measured)
        if base:
            base.run_round(measured)
    headline, components = timed.timings()
    machine = f"{platform.machine()} {platform.processor()}".strip()
    report = ProfileReport(str(directory), timed.runtime, headline, components, machine=machine)
    if base:
        report.baseline_directory = str(baseline)
        report.baseline, report.baseline_components = base.timings()
        report.speedup = report.baseline.median_ms / report.timing.median_ms
    return report
