"""FastV (Chen et al., ECCV 2024) scoring and selection (methods.md §6).

At decoder layer K, keep the image tokens that the last prompt token attended to most at layer K-1 (mean over
heads). The tensor functions below are what the prefill graph runs (through the shared select op).
"""

from __future__ import annotations

from torch import Tensor

from tpc.methods.base import Param, PrefillMethod
from tpc.ops import select_indices


def scores(attn: Tensor, image_start: int, num_image: int) -> Tensor:
    """(B, H, L, L) or (B, H, 1, L) attention of layer K-1 -> (B, num_image): the last query row, head mean."""
    last_row = attn[:, :, -1, :].mean(dim=1)
    return last_row[:, image_start : image_start + num_image]


def keep_count(num_image: int, ratio: float) -> int:
    """round(N_img * (1 - R)) kept tokens for prune ratio R."""
    return round(num_image * (1 - ratio))


def select(image_scores: Tensor, keep: int) -> Tensor:
    """(B, num_image) -> (B, keep) kept image-token indices (relative to the image span), ascending."""
    return select_indices(image_scores, keep)


METHOD = PrefillMethod(
    name="fastv",
    summary="last-token attention row at LLM layer K-1; prunes from layer K on",
    reference="pkunlp-icler/FastV, ECCV 2024",
    priority=lambda signals, keep, params: signals.scores,
    prune_layer=lambda params: params["layer"],
    params=(Param("layer", int, 2, "decoder layer K (0-based) from which image tokens are pruned", "decoder"),),
)
