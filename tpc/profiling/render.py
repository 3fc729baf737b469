"""The terminal view of a profile report: the tables a deployment engineer reads first, then the warnings."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tpc.profiling.report import ExportProfile, ProfileReport
from tpc.profiling.stats import Summary


def _row(label: str, graph: str, t: Summary) -> list[str]:
    return [
        label,
        graph,
        f"{t.p50_ms:.3f}",
        f"{t.p90_ms:.3f}",
        f"{t.p99_ms:.3f}",
        f"{t.min_ms:.3f}",
        f"{t.max_ms:.3f}",
        f"{t.mean_ms:.3f} ± {t.std_ms:.3f}",
        f"{t.runs} ({t.tail_samples} ≥ p99)",
    ]


def _latency_table(report: ProfileReport) -> Table:
    machine = report.machine
    cores = f" ({machine.cores} cores)" if machine.cores else ""
    table = Table(title=f"profile: {report.export.runtime} on {machine.cpu}{cores}")
    for column in ("export", "graph", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms", "mean ± std", "runs"):
        table.add_column(column)
    sides = [(report.export.directory, report.export)]
    if report.baseline is not None:
        sides.append((f"{report.baseline.directory} (baseline)", report.baseline))
    for label, side in sides:
        table.add_row(*_row(label, side.headline, side.timing))
        if len(side.components) > 1:
            for name, summary in side.components.items():
                table.add_row(*_row("", name + (" (per token)" if name == "decode" else ""), summary))
        if side.generation is not None:
            table.add_row(*_row("", f"generation of {side.generation_tokens} tokens", side.generation))
    return table


def _facts(side: ExportProfile) -> str:
    parts = [f"{side.throughput_per_s:.1f} calls/s", f"artifacts {side.artifact_bytes / 2**20:.1f} MiB"]
    if side.threads is not None:
        parts.append(f"{side.threads} threads")
    if side.cold is not None:
        cold = side.cold
        parts.append(
            f"cold start: import {cold.import_ms:.0f} ms, load {cold.load_ms:.0f} ms, first call "
            f"{cold.first_run_ms:.1f} ms; peak memory +{cold.peak_rss_mib:.0f} MiB"
        )
    elif side.cold_unavailable:
        parts.append(f"cold start {side.cold_unavailable}")
    return f"{side.directory}: " + "; ".join(parts)


def _deadlines(side: ExportProfile) -> Table | None:
    if not side.deadlines:
        return None
    first = next(iter(side.deadlines.values()))
    table = Table(title=f"{side.directory} at {first.rate_hz:g} Hz (deadline {first.deadline_ms:.1f} ms)")
    for column in ("graph", "misses", "share", "worst overrun ms", "rate its p99 sustains"):
        table.add_column(column)
    for name, d in side.deadlines.items():
        table.add_row(name, str(d.misses), f"{d.share:.1%}", f"{d.worst_overrun_ms:.2f}", f"{d.sustained_hz:.1f} Hz")
    return table


def _operators(side: ExportProfile) -> Table | None:
    if not side.operators:
        return None
    table = Table(title=f"{side.directory}: operator time by stage ({side.runtime} profiler)")
    for column in ("graph", "stage", "ms per call", "share", "operators"):
        table.add_column(column)
    for component, breakdown in side.operators.items():
        for stage in breakdown.stages:
            table.add_row(component, stage.stage, f"{stage.ms:.3f}", f"{stage.share:.1%}", str(stage.operators))
    return table


def _slowest(side: ExportProfile) -> Table | None:
    if not side.operators:
        return None
    table = Table(title=f"{side.directory}: slowest operators")
    for column in ("graph", "operator", "type", "stage", "ms per call", "share"):
        table.add_column(column)
    for component, breakdown in side.operators.items():
        for row in breakdown.top:
            table.add_row(component, row.name, row.op_type, row.stage, f"{row.ms:.3f}", f"{row.share:.1%}")
    return table


def render(report: ProfileReport, out: Console) -> None:
    out.print(_latency_table(report))
    for side in (report.export, report.baseline):
        if side is None:
            continue
        out.print(_facts(side), soft_wrap=True)
        for table in (_deadlines(side), _operators(side), _slowest(side)):
            if table is not None:
                out.print(table)
        if side.operators_unavailable:
            out.print(f"{side.directory}: no per-operator profile ({side.operators_unavailable})", soft_wrap=True)
    comparison = report.comparison
    if comparison is not None:
        colour = "green" if comparison.measurable and comparison.ratios[0].ratio > 1 else "yellow"
        out.print(f"[{colour}]{comparison.verdict}[/{colour}]", soft_wrap=True)
        ratios = ", ".join(f"p{r.percentile} {r.ratio:.2f}x [{r.low:.2f}, {r.high:.2f}]" for r in comparison.ratios)
        out.print(
            f"speedup per percentile (baseline / export, {comparison.ratios[0].confidence:.0%} interval): {ratios}"
        )
        ideal = comparison.ideal
        if ideal is not None:
            out.print(
                f"ideal speedup: FLOPs {ideal.flops_ideal:.2f}x, calibrated on the baseline's stage rates "
                f"{ideal.calibrated_ideal:.2f}x ({ideal.basis}); measured p50 reaches {ideal.reached:.0%} of the "
                f"calibrated ideal; {ideal.untouchable_share:.0%} of the baseline's latency is out of pruning's reach",
                soft_wrap=True,
            )
        elif comparison.ideal_unavailable:
            out.print(f"ideal speedups: {comparison.ideal_unavailable}", soft_wrap=True)
    settings = report.settings
    how = f"{settings.runs} rounds after {settings.warmup} warm-up, {settings.order}"
    if settings.auto:
        how += f"; --runs auto stopped by {settings.stopped_by}"
    out.print(how)
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
