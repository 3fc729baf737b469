"""The speedups an ideal runtime would reach, set beside a measured one: is a small speedup the runtime's fault?

Two ideals, from the stage costs both exports recorded at export (tpc.json `cost`, tpc.contract.cost) and the
unpruned (baseline) export's measured times:

- the FLOPs ideal: every stage at one rate, so the speedup is the headline's unpruned FLOPs over its pruned FLOPs;
- the calibrated ideal: each stage at the FLOP rate the baseline measured for it (a tower's convolutions and a
  decoder's matrix products do not run at one rate). Ideal pruned time = fixed overhead + Σ_stage pruned FLOPs /
  (baseline FLOPs / baseline ms); a stage of no FLOPs (an embedding gather, operators outside any stage) keeps the
  baseline's measured time.

And the untouchable share: the part of the baseline's latency no pruning removes, the fixed per-call overhead (an
empty graph of the same I/O, tpc.profiling.overhead), the stages of no FLOPs, and each stage's floor (the FLOPs it
would still spend with no image token left: an unpruned tower, the text tokens, the LM head, decode's weights)
at that stage's rate.

Measured times come per stage (a runtime's per-operator profile grouped into tpc's stages) or, where there is no
such profile, per component (`stage=None`: the whole graph, one stage at one rate). A component whose profile
misses a stage that has FLOPs is taken whole too: its unattributed time would otherwise inflate another stage's
rate. Stages are matched across the two exports by name within the headline's components (a FastV export's
`prefill_before` against the baseline's layers, which are all `prefill_after`: a stage the baseline lacks runs at
its sibling's rate, else at the headline's overall rate); whole components are matched by position in the two
headlines (a VLA-Pruner export's `pruned` step against the baseline's `step`).

Pure functions on typed records: no runtime, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tpc.contract.cost import StageCost
from tpc.contract.names import PREFILL_AFTER, PREFILL_BEFORE

OPERATORS, COMPONENTS = "operators", "components"  # the basis of a calibrated ideal
# a stage the baseline lacks runs at its sibling's rate: the decoder layers on either side of the prune point
SIBLINGS = {PREFILL_BEFORE: PREFILL_AFTER, PREFILL_AFTER: PREFILL_BEFORE}


@dataclass(frozen=True)
class MeasuredTime:
    """Milliseconds per call of one stage of one component of the baseline, fixed overhead excluded; `stage`
    None: the whole component (no per-operator profile)."""

    component: str
    stage: str | None
    ms: float


@dataclass(frozen=True)
class StageRate:
    """A stage's (or a whole component's) FLOP rate in the baseline: its FLOPs per call over its measured time."""

    label: str  # the stage's name, or the component's when it was measured whole
    flops: int
    ms: float

    @property
    def gflops_per_s(self) -> float | None:
        return self.flops / self.ms / 1e6 if self.flops > 0 and self.ms > 0 else None


@dataclass(frozen=True)
class IdealSpeedups:
    flops_ideal: float | None  # None: the pruned headline has no FLOPs
    calibrated_ideal: float | None  # None: nothing was measured
    untouchable_share: float  # of the baseline's headline time (overhead included)
    basis: str  # OPERATORS: every headline component profiled per stage; COMPONENTS otherwise
    baseline_ms: float  # the baseline's headline time as the model sees it: overhead + its stages' times
    ideal_ms: float  # the pruned headline's time at the baseline's rates
    overhead_ms: float  # the baseline headline's fixed per-call overhead
    rates: tuple[StageRate, ...]

    @property
    def rates_gflops(self) -> dict[str, float]:
        """GFLOP/s by stage (or whole component), for the stages that have FLOPs and time."""
        return {r.label: rate for r in self.rates if (rate := r.gflops_per_s) is not None}


def per_component(wall_ms: Mapping[str, float], overhead_ms: Mapping[str, float] | None = None) -> list[MeasuredTime]:
    """Whole-component measurements from each component's wall time per call, its fixed overhead taken out."""
    overhead = overhead_ms or {}
    return [MeasuredTime(name, None, max(0.0, ms - overhead.get(name, 0.0))) for name, ms in wall_ms.items()]


@dataclass(frozen=True)
class Headline:
    """The components one call of each export is made of (tpc.kinds.registry's `headline`), in corresponding
    order: a VLM's vision + prefill in both; a stateful policy's `pruned` against the baseline's `step`."""

    pruned: tuple[str, ...]
    unpruned: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.pruned) != len(self.unpruned):
            raise ValueError(f"headlines {self.pruned} and {self.unpruned} do not correspond one to one")

    @classmethod
    def same(cls, components: Sequence[str]) -> Headline:
        return cls(tuple(components), tuple(components))


def flops_ideal(pruned: Sequence[StageCost], unpruned: Sequence[StageCost], headline: Headline) -> float | None:
    """The headline's unpruned FLOPs over its pruned FLOPs (every stage at one rate)."""
    full = sum(c.flops for c in unpruned if c.component in headline.unpruned)
    kept = sum(c.flops for c in pruned if c.component in headline.pruned)
    return full / kept if kept > 0 else None


Bucket = tuple[bool, str]  # (whole component, its name) or (a stage, its name)


def _whole_components(
    unpruned: Sequence[StageCost], measured: Sequence[MeasuredTime], names: tuple[str, ...]
) -> set[str]:
    """The headline's components calibrated whole: measured whole, or missing a stage that has FLOPs."""
    whole: set[str] = set()
    for name in names:
        times = [t for t in measured if t.component == name]
        timed = {t.stage for t in times if t.ms > 0}
        flops = {c.stage for c in unpruned if c.component == name and c.flops > 0}
        if any(t.stage is None for t in times) or not flops <= timed:
            whole.add(name)
    return whole


def ideal_speedups(
    pruned: Sequence[StageCost],
    unpruned: Sequence[StageCost],
    measured: Sequence[MeasuredTime],
    headline: Headline,
    overhead_ms: float = 0.0,
    pruned_overhead_ms: float | None = None,
) -> IdealSpeedups:
    """Both ideals and the untouchable share of one pruned export against its baseline (see the module docstring).

    `measured`: the baseline's times; `overhead_ms`: the fixed per-call overhead summed over the baseline headline's
    components; `pruned_overhead_ms`: the pruned export's (None: the same)."""
    whole = _whole_components(unpruned, measured, headline.unpruned)
    renamed = dict(zip(headline.pruned, headline.unpruned, strict=True))

    def bucket(component: str, stage: str | None) -> Bucket:
        return (True, component) if component in whole or stage is None else (False, stage)

    full: dict[Bucket, int] = {}
    floor: dict[Bucket, int] = {}
    kept: dict[Bucket, int] = {}
    ms: dict[Bucket, float] = {}
    for c in unpruned:
        if c.component in headline.unpruned:
            key = bucket(c.component, c.stage)
            full[key] = full.get(key, 0) + c.flops
            floor[key] = floor.get(key, 0) + c.floor_flops
    for c in pruned:
        if c.component in renamed:
            key = bucket(renamed[c.component], c.stage)
            kept[key] = kept.get(key, 0) + c.flops
    for t in measured:
        if t.component in headline.unpruned:
            key = bucket(t.component, t.stage)
            ms[key] = ms.get(key, 0.0) + t.ms
    keys = list(dict.fromkeys([*full, *kept, *ms]))
    rates = {key: full[key] / ms[key] for key in keys if full.get(key, 0) > 0 and ms.get(key, 0.0) > 0}
    timed_flops = sum(full[key] for key in rates)
    overall = timed_flops / sum(ms[key] for key in rates) if rates else None

    def rate(key: Bucket) -> float | None:
        if key in rates:
            return rates[key]
        sibling = (False, SIBLINGS.get(key[1], "")) if not key[0] else key
        return rates.get(sibling, overall)

    ideal = overhead_ms if pruned_overhead_ms is None else pruned_overhead_ms
    untouchable = overhead_ms
    for key in keys:
        measured_ms, flops = ms.get(key, 0.0), kept.get(key, 0)
        if full.get(key, 0) == 0:  # no FLOPs in the baseline: its time stays, and no pruning removes it
            untouchable += measured_ms
        elif measured_ms > 0:
            untouchable += measured_ms * min(floor.get(key, 0), full[key]) / full[key]
        if flops > 0:
            at = rate(key)
            ideal += flops / at if at else measured_ms
        elif full.get(key, 0) == 0:
            ideal += measured_ms
    baseline = overhead_ms + sum(ms.values())
    labels = [StageRate(key[1], full.get(key, 0), ms.get(key, 0.0)) for key in keys if key in full or key in ms]
    return IdealSpeedups(
        flops_ideal=flops_ideal(pruned, unpruned, headline),
        calibrated_ideal=baseline / ideal if baseline > 0 and ideal > 0 else None,
        untouchable_share=min(1.0, untouchable / baseline) if baseline > 0 else 0.0,
        basis=COMPONENTS if whole else OPERATORS,
        baseline_ms=baseline,
        ideal_ms=ideal,
        overhead_ms=overhead_ms,
        rates=tuple(labels),
    )


def unavailable(pruned: Sequence[StageCost] | None, unpruned: Sequence[StageCost] | None) -> str | None:
    """Why no ideal can be computed for this pair of exports (None: it can)."""
    missing = [name for name, cost in (("the export", pruned), ("the baseline", unpruned)) if cost is None]
    if missing:
        return (
            f"{' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} written before tpc recorded per-stage "
            "costs in tpc.json (re-export to see the ideal speedups)"
        )
    return None
