"""Cold start of an export, measured in a fresh process: `python -m tpc.profiling.cold DIR` prints one JSON line.

The warm timings of `tpc profile` come from a process that has long imported its runtime and loaded the export;
what a deployment pays on start (a phone app launching, a robot's process restarting) is only visible in a process
that has done neither. Its memory is measured there too: the process's peak resident set over the load and a few
runs, less what it held before loading, is what the export itself costs, unmixed with a baseline's.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tpc.contract.manifest import INPUTS_FILE, Manifest, read_samples
from tpc.errors import UsageError
from tpc.kinds import record_of
from tpc.profiling.report import ColdStart
from tpc.runtimes.base import open_component, runtime_of

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
WARM_RUNS = 3  # runs after the first, so that the peak covers a steady call too
TIMEOUT_S = 900


def _status_kib(field: str) -> float | None:
    if not STATUS.is_file():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS: Linux only, and not in every container."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def measure(directory: Path) -> ColdStart:
    manifest = Manifest.read(directory)
    runtime = runtime_of(manifest)
    inputs = {spec.name: read_samples(directory, spec.name, INPUTS_FILE) for spec in manifest.components}
    headline = record_of(manifest).headline([spec.name for spec in manifest.components])
    start = time.perf_counter()
    for module in runtime.requires:
        importlib.import_module(module)
    import_ms = (time.perf_counter() - start) * 1e3
    before = _status_kib("VmRSS")
    peak_resettable = _reset_peak()
    start = time.perf_counter()
    sessions = {spec.name: open_component(runtime, directory, spec) for spec in manifest.components}
    load_ms = (time.perf_counter() - start) * 1e3
    first_run_ms = 0.0
    for name, session in sessions.items():
        start = time.perf_counter()
        session.run(inputs[name])
        first_run_ms += (time.perf_counter() - start) * 1e3 if name in headline else 0.0
    for _ in range(WARM_RUNS):
        for name, session in sessions.items():
            session.run(inputs[name])
    peak = _status_kib("VmHWM") if peak_resettable else None
    if peak is None or before is None:  # macOS and containers without clear_refs: the process's lifetime peak
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, before = (maxrss / 1024 if sys.platform == "darwin" else maxrss), before or 0.0
    return ColdStart(import_ms, load_ms, first_run_ms, max(0.0, (peak - before) / 1024))


def cold_start(directory: Path, processes: int = 1) -> tuple[ColdStart | None, str | None]:
    """Run `measure` in `processes` fresh interpreters, one after the other; each figure is their median (a peak
    resident set moves by a few percent from one process to the next). (None, why) when a process fails."""
    measured = []
    for _ in range(processes):
        try:
            done = subprocess.run(
                [sys.executable, "-m", "tpc.profiling.cold", str(directory)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, f"the cold-start process did not finish in {TIMEOUT_S} s"
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"the cold-start process failed (exit {done.returncode}): {last[:200]}"
        measured.append(ColdStart(**json.loads(lines[-1])))
    figures = {
        name: statistics.median(getattr(m, name) for m in measured)
        for name in ("import_ms", "load_ms", "first_run_ms", "peak_rss_mib")
    }
    return ColdStart(**figures, processes=processes), None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tpc.profiling.cold DIR", file=sys.stderr)
        return 2
    try:
        print(json.dumps(asdict(measure(Path(argv[0])))))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
