"""`tpc profile`: an export's latency in its runtime measured the way deployment engineers measure it.

Cold start in a fresh process; warm latency as a distribution (p50/p90/p99 with the samples behind the tail);
a VLM's time to first token, per-token decode and whole generation; a policy's warm-up and pruned steps against a
control rate; the runtime's per-operator profile grouped by tpc's stages. With `--baseline`, both exports run
interleaved in one process and the speedup is a ratio per percentile with a bootstrap interval ("no measurable
difference" when it includes 1), beside the FLOPs ideal and the ideal calibrated on the baseline's own stage rates.
Every figure lands in one versioned report (`tpc.profiling.report.SCHEMA`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tpc.contract.manifest import Manifest
from tpc.errors import UsageError
from tpc.kinds import record_of
from tpc.profiling.cold import cold_start
from tpc.profiling.ideal import Headline, MeasuredTime, ideal_speedups, per_component, unavailable
from tpc.profiling.machine import this_machine
from tpc.profiling.overhead import call_overhead
from tpc.profiling.plot import plot
from tpc.profiling.recorded import etdump_profile
from tpc.profiling.render import render
from tpc.profiling.report import ColdStart, Comparison, Deadline, ExportProfile, Ideal, ProfileReport, Settings
from tpc.profiling.stages import onnx_breakdown, operators_unavailable
from tpc.profiling.stats import Ratio, Summary, median_interval, noise_check, paired_ratios
from tpc.profiling.timing import (
    TimedExport,
    artifact_bytes,
    export_summary,
    interleave,
    process_threads,
    throughput,
    time_generations,
)
from tpc.progress import Step, silent

__all__ = ["ProfileOptions", "ProfileReport", "Summary", "TimedExport", "etdump_profile", "plot", "profile", "render"]

MAX_RUNS, MAX_WARMUP = 100_000, 10_000  # documented caps: a median over more runs says nothing new
AUTO_BATCH = 20  # `--runs auto` times this many rounds between checks of the interval


@dataclass(frozen=True)
class ProfileOptions:
    """How to measure. `runs` None: `--runs auto`, rounds until the headline's p50 interval (the ratio's, with a
    baseline) is narrower than ±`precision`, or `max_seconds` have passed."""

    runs: int | None = 50
    warmup: int = 5
    precision: float = 0.05
    confidence: float = 0.95
    max_seconds: float = 300.0
    rate_hz: float | None = None  # a policy's control rate: deadline misses per graph
    tokens: int | None = None  # a VLM's whole generation: tokens generated (default: up to 16)
    cold: bool = True
    cold_processes: int = 1  # fresh processes for the cold start and peak memory (medians)
    operators: bool = True  # the runtime's per-operator profile, grouped by stage (a separate pass after timing)
    operator_runs: int = 20

    def check(self) -> None:
        if self.runs is not None and not 1 <= self.runs <= MAX_RUNS:
            raise UsageError(f"--runs must be 'auto' or in 1..{MAX_RUNS}, got {self.runs}")
        if not 0 <= self.warmup <= MAX_WARMUP:
            raise UsageError(f"--warmup must be in 0..{MAX_WARMUP}, got {self.warmup}")
        if not 0 < self.precision < 1:
            raise UsageError(f"--precision is a relative error in (0, 1), e.g. 0.05 for ±5 %; got {self.precision}")
        if not 0.5 <= self.confidence < 1:
            raise UsageError(f"--confidence must be in [0.5, 1), e.g. 0.95; got {self.confidence}")
        if not self.max_seconds > 0:
            raise UsageError(f"--max-seconds must be positive, got {self.max_seconds}")
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise UsageError(f"--rate is a control rate in Hz, positive; got {self.rate_hz}")
        if not 1 <= self.cold_processes <= 100:
            raise UsageError(f"--cold-processes must be in 1..100, got {self.cold_processes}")
        if self.tokens is not None and self.tokens < 1:
            raise UsageError(f"--tokens must be at least 1, got {self.tokens}")


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


def deadline(samples_ms: list[float], rate_hz: float) -> Deadline:
    period = 1e3 / rate_hz
    overruns = [ms - period for ms in samples_ms if ms > period]
    p99 = Summary.of(samples_ms).p99_ms
    return Deadline(
        rate_hz, period, len(overruns), len(overruns) / len(samples_ms), max(overruns, default=0.0), 1e3 / p99
    )


def _profile_of(timed: TimedExport, options: ProfileOptions, step: Step) -> ExportProfile:
    manifest, record = timed.manifest, timed.record
    headline = record.headline_label
    if record.control_loop and timed.headline_parts != tuple(timed.sessions):  # a stateful policy's steady state
        headline += f" ({', '.join(timed.headline_parts)})"
    cold: ColdStart | None = None
    cold_unavailable: str | None = "not measured (--no-cold)"
    if options.cold:
        with step(f"{timed.directory}: cold start and peak memory in {options.cold_processes} fresh process(es)"):
            cold, cold_unavailable = cold_start(timed.directory, options.cold_processes)
    components = dict(timed.times)
    profile = ExportProfile(
        directory=str(timed.directory),
        runtime=timed.runtime.name,
        kind=record.name,
        export=export_summary(manifest),
        headline=headline,
        headline_components=list(timed.headline_parts),
        timing=Summary.of(timed.headline),
        samples_ms=list(timed.headline),
        components={name: Summary.of(samples) for name, samples in components.items()},
        component_samples_ms=components,
        throughput_per_s=throughput(manifest.batch, timed.headline),
        artifact_bytes=artifact_bytes(timed.directory, manifest),
        threads=process_threads(),
        noise=noise_check(timed.headline, options.precision, f"{timed.directory} ({headline})"),
        cold=cold,
        cold_unavailable=cold_unavailable,
    )
    if timed.generation:
        profile.generation = Summary.of(timed.generation)
        profile.generation_tokens = options.tokens
    reason = operators_unavailable(timed.runtime.name) if options.operators else "not measured (--no-operators)"
    if reason is None:
        runs = min(options.operator_runs, max(1, len(timed.headline)))
        with step(f"{timed.directory}: per-operator profile, {runs} runs per graph"):
            profile.operators = {
                name: onnx_breakdown(timed.directory, manifest, name, timed.inputs[name], runs, warmup=2)
                for name in timed.sessions
            }
    profile.operators_unavailable = reason
    with step(f"{timed.directory}: fixed per-call overhead (an empty graph of the same I/O)"):
        overheads = {spec.name: call_overhead(spec, timed.runtime.name) for spec in manifest.components}
    profile.overhead_ms = {name: o.ms for name, o in overheads.items() if o.ms is not None}
    if record.control_loop and options.rate_hz is not None:
        profile.deadlines = {name: deadline(samples, options.rate_hz) for name, samples in components.items()}
    return profile


def verdict(ratio: Ratio) -> str:
    interval = f"p50; {ratio.confidence:.0%} interval {ratio.low:.2f}-{ratio.high:.2f}x"
    if not ratio.measurable:
        return f"no measurable difference (ratio {ratio.ratio:.2f}x, {interval}, which includes 1)"
    if ratio.ratio > 1:
        return f"{ratio.ratio:.2f}x faster than the baseline ({interval})"
    return f"{1 / ratio.ratio:.2f}x slower than the baseline (ratio {ratio.ratio:.2f}x, {interval})"


def measured_stages(side: ExportProfile, components: tuple[str, ...]) -> list[MeasuredTime]:
    """The baseline's time per call of each stage of its headline components, fixed overhead excluded.

    With a per-operator profile, each component's stage times are scaled to its measured p50 less its overhead:
    the profiler's operator times leave out the runtime's work between operators, which the stages share in
    proportion. Without one, each component is one stage, measured whole."""
    overhead = side.overhead_ms
    wall = {name: side.components[name].p50_ms for name in components}
    if not all(name in side.operators and side.operators[name].total_ms > 0 for name in components):
        return per_component(wall, overhead)
    measured = []
    for name in components:
        breakdown = side.operators[name]
        scale = max(0.0, wall[name] - overhead.get(name, 0.0)) / breakdown.total_ms
        measured += [MeasuredTime(name, stage.stage, stage.ms * scale) for stage in breakdown.stages]
    return measured


def ideal_of(
    timed: TimedExport, base: TimedExport, export: ExportProfile, baseline: ExportProfile, speedup: float
) -> tuple[Ideal | None, str | None]:
    """The FLOPs and calibrated ideals of this pair (tpc.profiling.ideal), or why there are none."""
    reason = unavailable(timed.manifest.cost, base.manifest.cost)
    if reason is not None or timed.manifest.cost is None or base.manifest.cost is None:
        return None, reason
    headline = Headline(tuple(timed.headline_parts), tuple(base.headline_parts))
    overhead = [side.overhead_ms for side in (baseline, export)]
    has_overhead = all(name in overhead[0] for name in headline.unpruned)
    ideal = ideal_speedups(
        timed.manifest.cost,
        base.manifest.cost,
        measured_stages(baseline, headline.unpruned),
        headline,
        overhead_ms=sum(overhead[0].get(name, 0.0) for name in headline.unpruned),
        pruned_overhead_ms=sum(overhead[1].get(name, 0.0) for name in headline.pruned),
    )
    if ideal.flops_ideal is None or ideal.calibrated_ideal is None:
        return None, "the headline has no FLOPs recorded, or nothing of it was measured"
    return (
        Ideal(
            flops_ideal=ideal.flops_ideal,
            calibrated_ideal=ideal.calibrated_ideal,
            reached=speedup / ideal.calibrated_ideal,
            untouchable_share=ideal.untouchable_share,
            basis=ideal.basis,
            stage_rates_gflops=ideal.rates_gflops,
            fixed_overhead_ms=ideal.overhead_ms if has_overhead else None,
        ),
        None,
    )


def _compare(timed: TimedExport, base: TimedExport, report: ProfileReport, options: ProfileOptions) -> Comparison:
    ratios = paired_ratios(timed.headline, base.headline, options.confidence)
    components = {
        name: paired_ratios(samples, base.times[name], options.confidence)
        for name, samples in timed.times.items()
        if name in base.times
    }
    assert report.baseline is not None
    ideal, reason = ideal_of(timed, base, report.export, report.baseline, ratios[0].ratio)
    return Comparison(ratios, components, verdict(ratios[0]), ratios[0].measurable, ideal, reason)


def precise_enough(export_ms: list[float], baseline_ms: list[float] | None, options: ProfileOptions) -> bool:
    """`--runs auto`'s stopping rule: the p50 ratio's interval (one export alone: its median's) is within
    ±precision of the point estimate."""
    if baseline_ms is not None:
        return paired_ratios(export_ms, baseline_ms, options.confidence)[0].relative_half_width <= options.precision
    low, high = median_interval(export_ms, options.confidence)
    return (high - low) / 2 <= options.precision * Summary.of(export_ms).p50_ms


def _measure(exports: list[TimedExport], options: ProfileOptions) -> tuple[int, str]:
    """Warm up, then time rounds: a fixed number, or (`--runs auto`) batches until precise enough or out of time.
    Returns the rounds timed and what stopped them."""
    interleave(exports, options.warmup, record=False)
    if options.runs is not None:
        interleave(exports, options.runs, record=True, first=options.warmup)
        return options.runs, "runs"
    start, done = time.perf_counter(), 0
    while True:
        interleave(exports, AUTO_BATCH, record=True, first=options.warmup + done)
        done += AUTO_BATCH
        if precise_enough(exports[0].headline, exports[1].headline if len(exports) > 1 else None, options):
            return done, "precision"
        if time.perf_counter() - start > options.max_seconds:
            return done, "time cap"
        if done >= MAX_RUNS:
            return done, "runs"


def fitted(options: ProfileOptions, manifest: Manifest, directory: Path) -> ProfileOptions:
    """The options checked against what the export is (before anything is loaded): `--tokens` for a VLM, within
    its cache (default up to 16), `--rate` for a policy."""
    generation = manifest.generation
    if options.tokens is not None and generation is None:
        raise UsageError(f"--tokens times a VLM's whole generation; '{directory}' is not a VLM export")
    if options.rate_hz is not None and not record_of(manifest).control_loop:
        raise UsageError(
            f"--rate sets a control step's deadline; '{directory}' is not a policy export (no control step)"
        )
    if generation is None:
        return options
    tokens = options.tokens or min(16, generation.max_new_tokens)
    if tokens > generation.max_new_tokens:
        raise UsageError(
            f"--tokens {tokens} is more than this export's cache holds ({generation.max_new_tokens}); re-export "
            "with --max-new-tokens to generate more"
        )
    return replace(options, tokens=tokens)


def profile(
    directory: Path,
    runs: int | None = 50,
    warmup: int = 5,
    baseline: Path | None = None,
    options: ProfileOptions | None = None,
    step: Step = silent,
) -> ProfileReport:
    """Time the export in `directory` (and `baseline`, interleaved); `options` overrides runs and warmup. `step`
    reports each phase (the CLI shows them)."""
    options = replace(options or ProfileOptions(), runs=runs, warmup=warmup)
    options.check()
    options = fitted(options, Manifest.read(Path(directory)), Path(directory))
    with step("load the export" + (" and its baseline" if baseline is not None else "")):
        timed = TimedExport(Path(directory))
        exports = [timed]
        base = None
        if baseline is not None:
            base = TimedExport(Path(baseline))
            check_comparable(timed.manifest, base.manifest, Path(baseline))
            exports.append(base)
    generation = timed.manifest.generation
    what = "until the interval is narrow enough" if options.runs is None else f"{options.runs} rounds"
    with step(f"time {what} after {options.warmup} warm-up" + (", interleaved" if base else "")):
        rounds, stopped_by = _measure(exports, options)
    if options.tokens is not None and generation is not None:
        generations = max(3, min(rounds, 10))
        with step(f"time {generations} whole generations of {options.tokens} tokens"):
            time_generations(exports, options.tokens, generations)
    settings = Settings(
        runs=rounds,
        warmup=options.warmup,
        auto=options.runs is None,
        stopped_by=stopped_by,
        precision=options.precision,
        confidence=options.confidence,
        order="interleaved, order alternating every round" if base else "sequential",
    )
    report = ProfileReport(
        machine=this_machine(timed.runtime.versions()),
        settings=settings,
        export=_profile_of(timed, options, step),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if base is not None:
        report.baseline = _profile_of(base, options, step)
        report.comparison = _compare(timed, base, report, options)
        half_width = report.comparison.ratios[0].relative_half_width
        if half_width > options.precision:
            report.warnings.append(
                f"the p50 ratio's interval is ±{half_width:.1%}, wider than the asked precision "
                f"±{options.precision:.0%}: use more runs, --runs auto, or a quieter machine"
            )
    for side in (report.export, report.baseline):
        if side is not None:
            report.warnings.extend(side.noise.warnings)
            report.warnings.extend(overhead_warning(side))
    return report


OVERHEAD_WARNING = 0.2  # a fixed per-call overhead above this share of the headline hides what pruning changes


def overhead_warning(side: ExportProfile) -> list[str]:
    """A tiny model's latency is mostly the runtime's fixed cost per call, which no pruning removes: its speedup
    says little about a real model's. Said once, with the figures."""
    fixed = sum(side.overhead_ms.get(name, 0.0) for name in side.headline_components)
    share = fixed / side.timing.p50_ms if side.timing.p50_ms > 0 else 0.0
    if share <= OVERHEAD_WARNING:
        return []
    return [
        f"{side.directory}: {share:.0%} of its p50 ({fixed:.3f} of {side.timing.p50_ms:.3f} ms) is the runtime's fixed "
        "per-call overhead (an empty graph of the same I/O), which no pruning removes: on a model this small a speedup "
        "says little about a real one"
    ]
