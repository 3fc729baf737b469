"""HiPrune (Liu et al., arXiv 2508.00553), as `Danielement321/HiPrune` does it (docs/methods.md#hiprune).

Anchors are the most-attended patches of a middle ("object") encoder layer; each brings its four raster
neighbours (buffers); the rest of the budget goes to the most-attended patches of the deep layer that are not
already chosen (registers). The reference's count is exactly `keep` (LLaVA) but its anchor/register split is
data-dependent; the static rewrite of §1.8 (`where(anchor_or_buffer, +inf, deep)` then one top-`keep`) selects
the same set with fixed shapes, so the exported graph needs no dynamic shapes.

Neighbourhoods are in flat raster-index space (row wrap) and clamped to [0, N-1], exactly as the reference.

Layers: the reference reads its features from `hidden_states[p]` and its register attention from
`attentions[p]` (p = `vision_feature_layer`), so for p >= 0 the register ("deep") layer is p + 1, one past the
feature layer; `default_deep_layer` (tpc.methods.registry) does the same, and `--param deep_layer` overrides it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpc.methods.base import VisionSignals, accepts_unbatched
from tpc.methods.registry import (  # the record's pure rules, shared with this module's tensor functions
    DEFAULT_ALPHA,
    HIPRUNE,
    REFERENCE_DEPTH,
    REFERENCE_OBJECT_LAYER,
    anchor_count,
    check_budget,
    default_deep_layer,
    default_object_layer,
)
from tpc.ops import select_indices


@accepts_unbatched(batched_dims=4)
def scores(attn: Tensor, prefix_tokens: int = 1) -> Tensor:
    """(B, H, N, N) attention probabilities -> (B, N - prefix) attention received per patch.

    Mean over heads, then over all query rows (CLS row included), prefix columns dropped: §1.3.
    (H, N, N) gives (N - prefix,).
    """
    return attn.mean(dim=1).mean(dim=1)[:, prefix_tokens:]


def _grid_width(grid: int | tuple[int, int], num_tokens: int) -> int:
    height, width = (grid, grid) if isinstance(grid, int) else grid
    if height * width != num_tokens:
        raise ValueError(f"grid {height}x{width} does not match {num_tokens} scored tokens")
    return width


def anchor_buffer_mask(score_object: Tensor, keep: int, grid: int | tuple[int, int], alpha: float) -> Tensor:
    """(B, N) bool: the anchors and their raster neighbours a-1, a+1, a-w, a+w (clamped, duplicates merged)."""
    batch, num_tokens = score_object.shape
    width = _grid_width(grid, num_tokens)
    check_budget(keep, alpha)
    k_a = anchor_count(keep, alpha)
    if k_a == 0:  # the reference's topk(k=0): no anchors, pure deep-layer selection
        return torch.zeros_like(score_object, dtype=torch.bool)
    anchors = select_indices(score_object, k_a)
    neighbours = torch.stack([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width], dim=-1)
    candidates = neighbours.clamp(0, num_tokens - 1).reshape(batch, 5 * k_a, 1)
    positions = torch.arange(num_tokens, device=score_object.device)
    return (candidates == positions).any(dim=1)


def priority(
    score_object: Tensor, score_deep: Tensor, keep: int, grid: int | tuple[int, int], alpha: float = DEFAULT_ALPHA
) -> Tensor:
    """(B, N) priorities whose top-`keep` is HiPrune's kept set: anchors+buffers at +inf, then deep scores."""
    chosen = anchor_buffer_mask(score_object, keep, grid, alpha)
    return torch.where(chosen, torch.full_like(score_deep, float("inf")), score_deep)


@accepts_unbatched(batched_dims=2, tensor_args=2)
def select(
    score_object: Tensor, score_deep: Tensor, keep: int, grid: int | tuple[int, int], alpha: float = DEFAULT_ALPHA
) -> Tensor:
    """(B, N) object and deep scores -> (B, keep) kept patch indices, int64, ascending (§1.4, §1.8).

    (N,) vectors give (keep,).
    """
    return select_indices(priority(score_object, score_deep, keep, grid, alpha), keep)


# --- Qwen2.5-VL (§1.6) -------------------------------------------------------------------------------------


def qwen_reduce(attn: Tensor, reverse_indices: Tensor, merge: int = 4) -> Tensor:
    """(H, T, T) ViT-block attention in window order -> (T/merge,) received attention per merged token, raster order.

    Mean over heads, SUM over query rows, mean over the `merge` patches of each merged 2x2 token, then
    window order -> raster order with `reverse_indices` (= argsort(window_index)).
    """
    received = attn.mean(dim=0).sum(dim=0)
    return received.view(-1, merge).mean(dim=-1)[reverse_indices]


def qwen_budget(num_image_tokens: int, retain: float) -> int:
    """N' = round(n_image_tokens * RETAIN), Python rounding as the reference."""
    return round(num_image_tokens * retain)


def _qwen_merged_grid(grid_thw: tuple[int, int, int] | Tensor, merge_size: int = 2) -> tuple[int, int]:
    t, h, w = (int(v) for v in grid_thw)
    return t * (h // merge_size), w // merge_size


def qwen_select(
    shallow: Tensor,
    deep: Tensor,
    retain: float,
    grid_thw: tuple[int, int, int] | Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> Tensor:
    """Static fill rule (b) of §1.8: always exactly N' tokens, ascending.

    Equals the reference whenever no anchor/buffer token is re-picked as a register; otherwise the reference
    keeps fewer tokens and this fills the freed slots with the next-best deep tokens outside the
    anchor/buffer set. Takes (n,) or (B, n) vectors; returns the same rank.
    """
    deep = torch.as_tensor(deep)
    return select(shallow, deep, qwen_budget(deep.shape[-1], retain), _qwen_merged_grid(grid_thw), alpha)


def qwen_select_reference(
    shallow: Tensor,
    deep: Tensor,
    retain: float,
    grid_thw: tuple[int, int, int] | Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> Tensor:
    """The reference's data-dependent selection, duplicates quirk included (eager only, for parity studies).

    `deep - mask` does not exclude anchor/buffer tokens (deep values are column sums, often > 1), so a token
    can be picked twice and the result has N' - #duplicates unique tokens. Ties: value desc, index asc.
    """
    shallow, deep = torch.as_tensor(shallow), torch.as_tensor(deep)
    n = deep.shape[-1]
    keep = qwen_budget(n, retain)
    height, width = _qwen_merged_grid(grid_thw)
    mask = anchor_buffer_mask(shallow[None], keep, (height, width), alpha)[0]
    n_deep = keep - int(mask.sum())
    adjusted = deep - mask.to(deep.dtype)
    registers = select_indices(adjusted[None], n_deep)[0] if n_deep > 0 else deep.new_empty(0, dtype=torch.long)
    chosen = mask.clone()
    chosen[registers] = True
    return torch.arange(n, device=deep.device)[chosen]


def qwen_reference_kept(
    score_object: Tensor, score_deep: Tensor, keep: int, grid: int | tuple[int, int], alpha: float = DEFAULT_ALPHA
) -> Tensor:
    """(B, N) bool: the tokens the Qwen reference keeps, duplicates quirk included, with static shapes.

    The anchors and buffers AB, and every token ranked among the first n_d = keep - |AB| by `deep - AB` (value
    desc, index asc: the select op's order); an AB token ranked there takes a register's place, so the count is
    keep - #duplicates. All of them lie in `priority`'s top `keep` (the static fill), which adds the next-best
    deep tokens outside AB; this marks which of those slots the reference has. (B, N, N) comparisons, no sort.
    """
    chosen = anchor_buffer_mask(score_object, keep, grid, alpha)
    adjusted = score_deep - chosen.to(score_deep.dtype)
    index = torch.arange(adjusted.shape[-1], device=adjusted.device)
    other, this = adjusted[:, None, :], adjusted[:, :, None]  # [b, t, u]: does u rank before t?
    ahead = torch.logical_or(other > this, torch.logical_and(other == this, index[None, :] < index[:, None]))
    rank = ahead.to(torch.int32).sum(dim=-1)
    registers = keep - chosen.to(torch.int32).sum(dim=-1, keepdim=True)
    return torch.logical_or(chosen, rank < registers)


# --- the method as the pipeline uses it ------------------------------------------------------------------


def _priority_from_signals(signals: VisionSignals, keep: int, params: dict[str, Any]) -> Tensor:
    return priority(
        signals.received[params["object_layer"]],
        signals.received[params["deep_layer"]],
        keep,
        signals.grid,
        params["alpha"],
    )


METHOD = HIPRUNE  # declared in tpc.methods.registry; its priority is `_priority_from_signals` above

__all__ = [
    "DEFAULT_ALPHA",
    "METHOD",
    "REFERENCE_DEPTH",
    "REFERENCE_OBJECT_LAYER",
    "anchor_buffer_mask",
    "anchor_count",
    "check_budget",
    "default_deep_layer",
    "default_object_layer",
    "priority",
    "qwen_budget",
    "qwen_reduce",
    "qwen_reference_kept",
    "qwen_select",
    "qwen_select_reference",
    "scores",
    "select",
]
