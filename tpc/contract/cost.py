"""tpc.json's `cost`: what one call of each component costs, per stage, computed from the plan at export time.

`tpc profile` runs where torch (and so the planner) may not be installed; to set a measured speedup beside the
speedup an ideal runtime would reach, it needs the FLOPs of both exports' stages, so the exporter records them.

The model, per call of a component (its static batch included):

- `flops`: 2x multiply-adds of the stage's matrix products and attention, the figures `tpc inspect` reports
  (a decoder layer on n tokens attends to (n+1)//2 keys on average: causal). Gathers, norms, activations and the
  score reductions of the taps are not counted: `taps`, `select` and `embed` are 0-FLOP stages.
- `floor_flops`: the part of `flops` no pruning removes, what the stage would still cost with no image token
  left: the whole of a tower that runs on every patch, of the LM head and of the embedding; the text tokens' share
  of the decoder layers; nothing of a projector that runs on the kept tokens only.
- `bytes`: bytes moved, at the export's dtype: the weights of the stage's layers read once, its input and output
  hidden states, the K/V cache it writes (prefill) or reads in full and writes one position of (a static decode
  step reads the cache's whole capacity), the kept rows a select copies, the Q/K rows a tap reads. Weights are
  read once per call whatever the batch; everything else scales with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tpc.contract.names import STAGES


@dataclass(frozen=True)
class StageCost:
    """One stage of one component (tpc.contract.names: TOWER ... OTHER) for one call of the component."""

    component: str
    stage: str
    flops: int
    bytes: int
    floor_flops: int = 0  # the FLOPs no pruning removes (<= flops)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; valid: {', '.join(STAGES)}")
        if min(self.flops, self.bytes, self.floor_flops) < 0 or self.floor_flops > self.flops:
            raise ValueError(f"{self}: counts must be >= 0 and floor_flops <= flops")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageCost:
        return cls(
            component=str(data["component"]),
            stage=str(data["stage"]),
            flops=int(data["flops"]),
            bytes=int(data["bytes"]),
            floor_flops=int(data.get("floor_flops", 0)),
        )


def costs_to_dicts(costs: Iterable[StageCost]) -> list[dict[str, Any]]:
    return [cost.to_dict() for cost in costs]


def costs_from_dicts(data: Iterable[Mapping[str, Any]]) -> list[StageCost]:
    return [StageCost.from_dict(item) for item in data]


def total_flops(costs: Iterable[StageCost], components: Sequence[str] | None = None) -> int:
    """FLOPs of one call of each of `components` (None: every component)."""
    return sum(c.flops for c in costs if components is None or c.component in components)


def flops_by_component(costs: Iterable[StageCost]) -> dict[str, int]:
    """FLOPs per call of each component, in the order the costs list them."""
    totals: dict[str, int] = {}
    for cost in costs:
        totals[cost.component] = totals.get(cost.component, 0) + cost.flops
    return totals
