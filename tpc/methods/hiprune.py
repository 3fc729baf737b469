"""HiPrune (Liu et al., arXiv 2508.00553), as `Danielement321/HiPrune` does it (methods.md §1).

Anchors are the most-attended patches of a middle ("object") encoder layer; each brings its four raster
neighbours (buffers); the rest of the budget goes to the most-attended patches of the deep layer that are not
already chosen (registers). The reference's count is exactly `keep` (LLaVA) but its anchor/register split is
data-dependent; the static rewrite of §1.8 (`where(anchor_or_buffer, +inf, deep)` then one top-`keep`) selects
the same set with fixed shapes, so the exported graph needs no dynamic shapes.

Neighbourhoods are in flat raster-index space (row wrap) and clamped to [0, N-1], exactly as the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpc.methods.base import Param, VisionMethod, VisionSignals, accepts_unbatched
from tpc.ops import select_indices

DEFAULT_ALPHA = 0.1
# LLaVA-1.5's CLIP ViT-L/14-336: object layer 9 of 24 (1-based). Other depths scale it.
REFERENCE_OBJECT_LAYER, REFERENCE_DEPTH = 9, 24


@accepts_unbatched(batched_dims=4)
def scores(attn: Tensor, prefix_tokens: int = 1) -> Tensor:
    """(B, H, N, N) attention probabilities -> (B, N - prefix) attention received per patch.

    Mean over heads, then over all query rows (CLS row included), prefix columns dropped: §1.3.
    (H, N, N) gives (N - prefix,).
    """
    return attn.mean(dim=1).mean(dim=1)[:, prefix_tokens:]


def anchor_count(keep: int, alpha: float = DEFAULT_ALPHA) -> int:
    """k_a = round(keep * alpha / 5) with Python's round-half-to-even, as the reference."""
    return round(keep * alpha / 5)


def _grid_width(grid: int | tuple[int, int], num_tokens: int) -> int:
    height, width = (grid, grid) if isinstance(grid, int) else grid
    if height * width != num_tokens:
        raise ValueError(f"grid {height}x{width} does not match {num_tokens} scored tokens")
    return width


def check_budget(keep: int, alpha: float) -> None:
    """The reference fails (negative top-k) when anchors + buffers outgrow the budget; refuse such configs."""
    k_a = anchor_count(keep, alpha)
    if 5 * k_a > keep:
        raise ValueError(
            f"alpha={alpha} gives {k_a} anchor(s), whose {5 * k_a} anchor+buffer slots can exceed keep={keep}; "
            "lower alpha or raise keep"
        )


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


# --- the method as the pipeline uses it ------------------------------------------------------------------


def default_object_layer(num_layers: int) -> int:
    """Object layer 9 of 24 scaled to the encoder's depth (1-based, at least 1)."""
    return max(1, round(num_layers * REFERENCE_OBJECT_LAYER / REFERENCE_DEPTH))


def _priority_from_signals(signals: VisionSignals, keep: int, params: dict) -> Tensor:
    return priority(
        signals.received[params["object_layer"]],
        signals.received[params["deep_layer"]],
        keep,
        signals.grid,
        params["alpha"],
    )


METHOD = VisionMethod(
    name="hiprune",
    summary="anchors (object-layer attention) + raster-neighbour buffers + registers (deep-layer attention)",
    reference="Danielement321/HiPrune @6e83a12, arXiv 2508.00553",
    params=(
        Param("alpha", float, DEFAULT_ALPHA, "share of the budget for anchors + buffers (k_a = round(keep*alpha/5))"),
        Param("object_layer", int, None, "encoder layer of the anchor attention (default: 9 of 24, scaled)", "encoder"),
        Param(
            "deep_layer", int, None, "encoder layer of the register attention (default: the feature layer)", "encoder"
        ),
    ),
    tapped_layers=lambda params: (params["object_layer"], params["deep_layer"]),
    model_defaults=lambda depth, feature_layer: {
        "object_layer": default_object_layer(depth),
        "deep_layer": feature_layer,
    },
    check_budget=lambda keep, params: check_budget(keep, params["alpha"]),
    priority=_priority_from_signals,
)
