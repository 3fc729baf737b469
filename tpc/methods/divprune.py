"""DivPrune (Alvar et al., CVPR 2025), as `vbdi/divprune` does it (docs/methods.md#divprune).

Keep the K tokens that are most spread out in embedding space: greedy farthest-point (max-min) selection on
cosine distance. Iteration 0 picks the token farthest from its nearest neighbour (the 2nd smallest entry of
its distance column, the smallest being itself); every later iteration picks the token whose minimum distance
to the picked set is largest. `argmax` takes the first index on ties, as the reference.

The distance matrix is symmetrised so that the structural tie at iteration 0 (two mutual nearest neighbours)
is an exact tie, broken by the lower index. Already-picked tokens are masked out of later iterations: this
equals the reference whenever the reference returns K distinct tokens (it would otherwise re-pick a token of
near-zero self-distance, duplicating it), and keeps the static output free of duplicates.

The loop has K fixed iterations over fixed shapes, so it unrolls into a static graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpc.methods.base import VisionSignals, accepts_unbatched
from tpc.methods.registry import DIVPRUNE
from tpc.ops import select_indices


def distance_matrix(embeds: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, N, D) -> (B, N, N) symmetric cosine distance 1 - cos, computed in `dtype` (float32 is what exports run;
    float64 settles near-ties the way exact arithmetic does, for checking a pick order)."""
    x = embeds.to(dtype)
    unit = x / x.norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.transpose(-1, -2)
    return (distance + distance.transpose(-1, -2)) / 2


@accepts_unbatched(batched_dims=3)
def greedy_order(
    embeds: Tensor, keep: int, candidates: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(B, N, D) -> (B, keep) token indices in the order the greedy picks them; (N, D) -> (keep,).

    `candidates` (B, N) bool restricts the greedy to a subset (VLA-Pruner's union), with the same static shapes:
    distances from non-candidates are ignored and non-candidates are never picked.
    """
    batch, num_tokens, _ = embeds.shape
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep must be in [1, {num_tokens}], got {keep}")
    distance = distance_matrix(embeds, dtype)
    rows = torch.arange(batch, device=embeds.device)
    excluded = torch.zeros_like(distance[:, 0], dtype=torch.bool) if candidates is None else ~candidates
    # iteration 0: distance of each candidate to its nearest other candidate (2nd smallest in its column)
    among = torch.where(excluded.unsqueeze(-1), torch.full_like(distance, float("inf")), distance)
    nearest = torch.topk(among, 2, dim=-2, largest=False, sorted=True).values[:, 1, :]
    pick = torch.argmax(torch.where(excluded, torch.full_like(nearest, float("-inf")), nearest), dim=-1)
    picks = [pick]
    picked = excluded | torch.nn.functional.one_hot(pick, num_tokens).bool()
    min_distance = distance[rows, pick]  # (B, N): distance of every token to the picked set
    for _ in range(keep - 1):
        candidate = torch.where(picked, torch.full_like(min_distance, float("-inf")), min_distance)
        pick = torch.argmax(candidate, dim=-1)
        picks.append(pick)
        picked = picked | torch.nn.functional.one_hot(pick, num_tokens).bool()
        min_distance = torch.minimum(min_distance, distance[rows, pick])
    return torch.stack(picks, dim=-1)


def priority(embeds: Tensor, keep: int) -> Tensor:
    """(B, N) priorities whose top-`keep` is the greedy's pick set: keep - rank for picked tokens, 0 elsewhere."""
    order = greedy_order(embeds, keep)
    rank_value = torch.arange(keep, 0, -1, device=embeds.device, dtype=torch.float32).expand_as(order)
    return torch.zeros(embeds.shape[:2], device=embeds.device).scatter(1, order, rank_value)


@accepts_unbatched(batched_dims=3)
def select(embeds: Tensor, keep: int) -> Tensor:
    """(B, N, D) embeddings -> (B, keep) kept indices, int64, ascending; (N, D) -> (keep,)."""
    return select_indices(priority(embeds, keep), keep)


def _priority_from_signals(signals: VisionSignals, keep: int, params: dict[str, Any]) -> Tensor:
    return priority(signals.features, keep)


METHOD = DIVPRUNE  # declared in tpc.methods.registry; its priority is `_priority_from_signals` above
