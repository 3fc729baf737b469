"""What the export-then-time benchmarks share: reuse of verified exports, one log line per export stage, and the
timing etiquette on a shared machine (wait while `/tmp/tpc-bench/BUSY` exists, hold `/tmp/tpc-bench/TIMING`
while timing)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from tpc.contract.manifest import Manifest
from tpc.exporting import export
from tpc.pipeline import PruneRequest
from tpc.progress import Step

SIGNALS = Path("/tmp/tpc-bench")
BUSY, TIMING = SIGNALS / "BUSY", SIGNALS / "TIMING"
BUSY_POLL_S, BUSY_MAX_S = 10, 15 * 60


def reusable(directory: Path, model: str, method: str, keep: int | None) -> Manifest | None:
    """An earlier run's export of the same request whose verification passed, else None."""
    if not (directory / "tpc.json").exists():
        return None
    try:
        manifest = Manifest.read(directory)
    except Exception:
        return None
    same = manifest.model["ref"] == model and manifest.method == method and (keep is None or manifest.keep == keep)
    passed = bool(manifest.verification and manifest.verification.get("passed"))
    return manifest if same and passed else None


def export_verified(request: PruneRequest, out: Path, samples: int, step: Step) -> bool:
    """Export `request` to ONNX over `out` and verify it in ONNX Runtime on `samples` seeds; True when it passed."""
    result = export(request, "onnx", out, force=True, run_verify=True, samples=samples, step=step)
    return bool(result.report and result.report.passed)


def console_steps(console: Console, prefix: str) -> Step:
    """A tpc `step` reporter that prints one line per finished stage (readable in a log file)."""

    @contextmanager
    def step(description: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        console.print(f"  {prefix}: {description} ({time.perf_counter() - start:.1f}s)")

    return step


def wait_while_busy(console: Console) -> float:
    """Wait while another process signals heavy work; returns the seconds waited."""
    start = time.monotonic()
    while BUSY.exists() and time.monotonic() - start < BUSY_MAX_S:
        console.print(f"{BUSY} exists; waiting ({time.monotonic() - start:.0f}s so far)")
        time.sleep(BUSY_POLL_S)
    if BUSY.exists():
        console.print(f"[yellow]{BUSY} still exists after {BUSY_MAX_S}s; timing anyway[/yellow]")
    return time.monotonic() - start


@contextmanager
def timing_flag() -> Iterator[None]:
    SIGNALS.mkdir(parents=True, exist_ok=True)
    TIMING.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        TIMING.unlink(missing_ok=True)
