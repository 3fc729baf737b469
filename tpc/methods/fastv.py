"""FastV (Chen et al., ECCV 2024) scoring and selection (docs/methods.md#fastv).

At decoder layer K, keep the image tokens that the last prompt token attended to most at layer K-1 (mean over
heads). The tensor functions below are what the prefill graph runs (through the shared select op).

The selection is made once, at prefill; the KV cache of layers K.. holds only the kept tokens (FastV's KV-cache
variant). The authors' evaluation runs without a KV cache and re-selects the image tokens at every generated
token, so its later tokens can see another image-token set than tpc's.
"""

from __future__ import annotations

from torch import Tensor

from tpc.methods.registry import FASTV
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


METHOD = FASTV  # declared in tpc.methods.registry
