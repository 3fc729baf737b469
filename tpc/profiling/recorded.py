"""Profiles recorded elsewhere, read into the same report: an ETDump from a phone (`tpc profile DIR --etdump FILE`).

A phone cannot run tpc, but its ExecuTorch runner can record an ETDump; reading it into the schema every local
profile uses means one set of tools (tables, `--json`, `--plot`, a CI's comparison script) for both. What the file
does not say (the device's CPU, its threads, a cold start) is recorded as unknown, never guessed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tpc.contract.manifest import Manifest
from tpc.kinds import record_of
from tpc.profiling.report import ExportProfile, Machine, ProfileReport, Settings
from tpc.profiling.stages import etdump_breakdown
from tpc.profiling.stats import Summary, noise_check
from tpc.profiling.timing import artifact_bytes, export_summary, throughput
from tpc.runtimes.executorch.etdump import etdump_report

UNKNOWN = "unknown (recorded on the device)"


def etdump_profile(
    directory: Path, etdump: Path, method: str | None, tick_ns: float, precision: float
) -> ProfileReport:
    """The report of one method's ETDump: its recorded executions as the latency samples, its operator rows grouped
    by stage (every row kept, not only the slowest)."""
    recorded = etdump_report(directory, etdump, method, tick_ns)
    manifest = Manifest.read(directory)
    warnings = []
    samples = recorded.run_ms
    if not samples:  # no Method::execute event: the operators' sum is all there is
        samples = [sum(row.total_ms for row in recorded.operators if row.kind != "other")]
        warnings.append(f"'{etdump}' holds no Method::execute event: the latency is the sum of its operator rows")
    headline = f"method {recorded.method}"
    side = ExportProfile(
        directory=str(directory),
        runtime="executorch (ETDump)",
        kind=record_of(manifest).name,
        export={**export_summary(manifest), "etdump": str(etdump), "etdump_method": recorded.method},
        headline=headline,
        headline_components=[recorded.method],
        timing=Summary.of(samples),
        samples_ms=samples,
        components={recorded.method: Summary.of(samples)},
        component_samples_ms={recorded.method: samples},
        throughput_per_s=throughput(manifest.batch, samples),
        artifact_bytes=artifact_bytes(Path(directory), manifest),
        threads=None,
        noise=noise_check(samples, precision, f"{etdump} ({headline})"),
        cold_unavailable="not recorded in an ETDump",
        operators={recorded.method: etdump_breakdown(recorded, top=len(recorded.operators))},
    )
    machine = Machine(UNKNOWN, UNKNOWN, None, None, None, "", {"executorch": "as built on the device"})
    settings = Settings(len(samples), 0, False, "etdump", precision, 0.95, "as recorded")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    report = ProfileReport(machine, settings, side, created=created)
    report.warnings.extend([*warnings, *side.noise.warnings])
    return report
