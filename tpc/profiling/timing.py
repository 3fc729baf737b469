"""Timing an export in its runtime: its components on their samples, a VLM's whole generation, and two exports
interleaved in one process.

Two exports are timed alternately (A B, then B A, ...), so that whatever the machine does during the run falls on
both alike and the first-in-a-round advantage (caches warm from the previous call) cancels; each round holds one
sample of each, which is what the paired bootstrap of `tpc.profiling.stats` resamples.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tpc.contract.manifest import GENERATION_FILE, INPUTS_FILE, SAMPLES_DIR, Manifest, read_npz, read_samples
from tpc.contract.names import Session
from tpc.kinds import record_of
from tpc.profiling.stats import Summary
from tpc.runtimes.base import open_component, runtime_of
from tpc.runtimes.generation import GenerationLoop


class TimedExport:
    """An export ready to time: each component's session with its first sample's inputs, and the times so far.

    The headline of a round is what one call of the whole export costs: an encoder's graph, a VLM's vision +
    prefill summed within the round (the time to first token), or a policy's steady-state control step.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        self.runtime = runtime_of(self.manifest)
        self.record = record_of(self.manifest)
        self.sessions: dict[str, Session] = {
            spec.name: open_component(self.runtime, self.directory, spec) for spec in self.manifest.components
        }
        self.inputs = {name: read_samples(self.directory, name, INPUTS_FILE) for name in self.sessions}
        self.headline_parts = self.record.headline(list(self.sessions))
        self.times: dict[str, list[float]] = {name: [] for name in self.sessions}
        self.headline: list[float] = []
        self.generation: list[float] = []

    def run_round(self, record: bool = True) -> None:
        """One timed call of each component, in the export's order."""
        total = 0.0
        for name, session in self.sessions.items():
            start = time.perf_counter()
            session.run(self.inputs[name])
            elapsed = (time.perf_counter() - start) * 1e3
            if record:
                self.times[name].append(elapsed)
            total += elapsed if name in self.headline_parts else 0.0
        if record:
            self.headline.append(total)

    def summaries(self) -> tuple[Summary, dict[str, Summary]]:
        """The headline's and each component's distribution so far."""
        return Summary.of(self.headline), {name: Summary.of(times) for name, times in self.times.items()}

    def generation_run(self, tokens: int) -> Callable[[], object] | None:
        """A VLM's whole greedy generation of `tokens` tokens on its generation sample (EOS ignored, so every run
        generates as many); None for other kinds."""
        generation = self.manifest.generation
        if generation is None:
            return None
        sample = read_npz(self.directory, f"{SAMPLES_DIR}/{GENERATION_FILE}")
        loop = GenerationLoop({name: session.run for name, session in self.sessions.items()}, generation)
        pixels, ids = sample["pixel_values"], sample["input_ids"]
        return lambda: loop.generate(pixels, ids, max_new_tokens=tokens, stop_at_eos=False)


def interleave(exports: list[TimedExport], rounds: int, record: bool, first: int = 0) -> None:
    """`rounds` rounds, each export once per round; the order reverses every round (A B, B A, ...). `first`: the
    number of rounds run before, so that a continued run keeps alternating."""
    for index in range(first, first + rounds):
        for timed in exports if index % 2 == 0 else exports[::-1]:
            timed.run_round(record)


def time_generations(exports: list[TimedExport], tokens: int, rounds: int) -> None:
    """Whole generations, interleaved like the rounds (one untimed first: the decode loop's first allocations)."""
    runs = [timed.generation_run(tokens) for timed in exports]
    for index in range(rounds + 1):
        order = list(zip(exports, runs, strict=True))
        for timed, run in order if index % 2 == 0 else order[::-1]:
            if run is None:
                continue
            start = time.perf_counter()
            run()
            if index > 0:
                timed.generation.append((time.perf_counter() - start) * 1e3)


def artifact_bytes(directory: Path, manifest: Manifest) -> int:
    """The size of the export's artifacts (an `.mlpackage` directory counted whole), not its samples."""
    total = 0
    for name in {spec.artifact for spec in manifest.methods}:
        path = directory / name
        files = path.rglob("*") if path.is_dir() else [path]
        total += sum(file.stat().st_size for file in files if file.is_file())
    return total


def process_threads() -> int:
    """Threads of this process now (Linux: /proc/self/task; elsewhere the Python-visible ones only)."""
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        return len(list(tasks.iterdir()))
    return threading.active_count()


def throughput(batch: int, samples_ms: list[float]) -> float:
    return float(batch * 1e3 / np.mean(samples_ms))


def export_summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "model": manifest.model.get("ref"),
        "family": manifest.model.get("family"),
        "method": manifest.method,
        "keep": manifest.keep,
        "params": manifest.params,
        "target": manifest.target,
        "dtype": manifest.dtype,
        "batch": manifest.batch,
        "tokens": manifest.tokens,
        "components": [spec.name for spec in manifest.components],
    }
