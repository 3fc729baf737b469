"""The statistics behind `tpc profile`'s figures: pure functions of latency samples (milliseconds), no I/O.

A latency is a distribution, not a number: a control loop cares about its p99, a dashboard about its median, and
a speedup is only a speedup if it survives the machine's noise. So every figure carries its sample count, a ratio
of two exports carries a bootstrap confidence interval, and a run says when the machine was too noisy to trust.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # a report is reproducible from its samples


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile by the nearest-rank rule (an observed sample, never an interpolation between two)."""
    ordered = np.sort(np.asarray(samples, dtype=np.float64))
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def samples_behind(q: float, count: int) -> int:
    """How many samples lie at or above the q-th percentile: a p99 of 50 runs is the largest of 50, one sample."""
    return count - max(1, math.ceil(q / 100 * count)) + 1


@dataclass(frozen=True)
class Summary:
    """One latency distribution. `tail_samples`: the samples at or above p99, how much evidence the p99 is."""

    runs: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    tail_samples: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Summary:
        values = np.asarray(samples_ms, dtype=np.float64)
        if values.size == 0:
            raise ValueError("a latency summary needs at least one sample")
        return cls(
            runs=int(values.size),
            min_ms=float(values.min()),
            p50_ms=percentile(values, 50),
            p90_ms=percentile(values, 90),
            p99_ms=percentile(values, 99),
            max_ms=float(values.max()),
            mean_ms=float(values.mean()),
            std_ms=float(values.std(ddof=1)) if values.size > 1 else 0.0,
            tail_samples=samples_behind(99, int(values.size)),
        )

    def at(self, q: int) -> float:
        return {50: self.p50_ms, 90: self.p90_ms, 99: self.p99_ms}[q]


@dataclass(frozen=True)
class Ratio:
    """baseline / export at one percentile (> 1: the export is faster), with its bootstrap interval."""

    percentile: int
    ratio: float
    low: float
    high: float
    confidence: float

    @property
    def measurable(self) -> bool:
        """False when the interval includes 1: the two cannot be told apart at this confidence."""
        return not self.low <= 1.0 <= self.high

    @property
    def relative_half_width(self) -> float:
        return (self.high - self.low) / (2 * self.ratio)


def paired_ratios(
    export_ms: Sequence[float],
    baseline_ms: Sequence[float],
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[Ratio]:
    """baseline / export at each of PERCENTILES, with a percentile-bootstrap interval that resamples *rounds*.

    The two exports ran alternately, one round holding one sample of each; resampling rounds (not each side apart)
    keeps what a round shares, so drift of the machine during the run widens neither side's tail apart from the
    other's."""
    export, baseline = np.asarray(export_ms, dtype=np.float64), np.asarray(baseline_ms, dtype=np.float64)
    if export.shape != baseline.shape or export.size == 0:
        raise ValueError("paired ratios need one sample of each export per round")
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, export.size, size=(resamples, export.size))
    resampled_export, resampled_baseline = np.sort(export[rounds], axis=1), np.sort(baseline[rounds], axis=1)
    tail = (1 - confidence) / 2
    ratios = []
    for q in PERCENTILES:
        rank = max(1, math.ceil(q / 100 * export.size)) - 1
        boot = resampled_baseline[:, rank] / resampled_export[:, rank]
        low, high = np.quantile(boot, [tail, 1 - tail])
        point = percentile(baseline, q) / percentile(export, q)
        ratios.append(Ratio(q, point, float(min(low, point)), float(max(high, point)), confidence))
    return ratios


def median_interval(
    samples_ms: Sequence[float], confidence: float = 0.95, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """A bootstrap interval of one export's median: what `--runs auto` narrows when there is no baseline."""
    values = np.asarray(samples_ms, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = np.median(values[rng.integers(0, values.size, size=(BOOTSTRAP_RESAMPLES, values.size))], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Noise:
    """How steady the machine was: the coefficient of variation, and the drift between the run's two halves
    (relative change of the median from the first half to the second). `warnings`: one line per figure that
    exceeds what the asked precision tolerates."""

    cv: float
    drift: float
    warnings: tuple[str, ...]


def noise_check(samples_ms: Sequence[float], precision: float, what: str) -> Noise:
    """Flags a run whose noise is too large for `precision` (the relative error the user asked for): a drift
    larger than the precision means the machine changed under the run (another job, frequency scaling); a
    coefficient of variation larger than 4 × precision means a median over this many runs barely resolves it."""
    values = np.asarray(samples_ms, dtype=np.float64)
    mean = float(values.mean())
    cv = float(values.std(ddof=1) / mean) if values.size > 1 and mean > 0 else 0.0
    half = values.size // 2
    drift = 0.0
    if half >= 2:
        first, second = float(np.median(values[:half])), float(np.median(values[half:]))
        drift = (second - first) / float(np.median(values))
    warnings = []
    if abs(drift) > precision:
        warnings.append(
            f"{what}: the median moved {drift:+.1%} from the first half of the runs to the second (more than the "
            f"asked precision {precision:.0%}): the machine changed during the run; close other work and rerun"
        )
    if cv > 4 * precision:
        warnings.append(
            f"{what}: coefficient of variation {cv:.1%} (more than 4x the asked precision {precision:.0%}): a noisy "
            "machine; use more runs (--runs auto) or a quieter machine"
        )
    return Noise(cv, drift, tuple(warnings))
