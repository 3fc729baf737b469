"""LVLM_CSP, Clustering, Scattering, Pruning (arXiv 2504.10854): the method's math as pure functions.

LVLM_CSP runs a few LLM layers on a small set of *representative* image tokens only; every other token is
attached to its nearest representative (cosine of embeddings) and, when the full set is readmitted, receives
the update its representative received in the skipped layers (`representative_update`). The representatives
come from a sampler: `uniform` (raster stride, the `uniform` baseline's tokens), `random` (the seeded `random`
baseline's tokens) or `cls-attention` (the tokens the vision tower's CLS row attends to most).

Every choice of tokens is expressed as priorities for the shared select op (`sampler_priority`), and the
clustering is gather / matmul / argmax over fixed shapes, so the model glue traces into a static graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpc.methods import random as random_baseline
from tpc.methods import uniform as uniform_baseline
from tpc.methods.base import accepts_unbatched
from tpc.methods.registry import CSP_SAMPLERS, LVLM_CSP
from tpc.methods.schedule import PrefillSignals
from tpc.ops import select_indices
from tpc.ops.select import gather_rows

SAMPLERS = CSP_SAMPLERS  # declared with the record, which lists and validates them without torch


def _check(num_tokens: int, count: int, sampler: str, cls_scores: Tensor | None) -> Tensor | None:
    """Validate a sampler request; returns the CLS scores as a float32 (N,) or (B, N) tensor when they are used."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if not 1 <= count <= num_tokens:
        raise ValueError(f"count must be in [1, {num_tokens}] (the number of image tokens), got {count}")
    if sampler != "cls-attention":
        return None
    if cls_scores is None:
        raise ValueError("sampler 'cls-attention' needs cls_scores: the CLS row's attention to each patch, (B, N)")
    scores = torch.as_tensor(cls_scores).to(torch.float32)
    if scores.dim() not in (1, 2) or scores.shape[-1] != num_tokens:
        raise ValueError(f"cls_scores must be (N,) or (B, N) with N = {num_tokens}, got {tuple(scores.shape)}")
    return scores


def sampler_priority(
    num_tokens: int, count: int, sampler: str = "uniform", seed: int = 0, cls_scores: Tensor | None = None
) -> Tensor:
    """(N,) float32 priorities, or (B, N) for `cls-attention` with (B, N) scores, whose top-`count` through the
    shared select op is `representatives(...)`."""
    scores = _check(num_tokens, count, sampler, cls_scores)
    if scores is not None:
        return scores
    if sampler == "uniform":
        return uniform_baseline.priority(num_tokens, count)
    return random_baseline.priority(num_tokens, seed)


def representatives(
    num_tokens: int, count: int, sampler: str = "uniform", seed: int = 0, cls_scores: Tensor | None = None
) -> Tensor:
    """The representative image-token indices, int64 ascending: (count,), or (B, count) for `cls-attention`
    with (B, N) scores.

    uniform: i * floor(N / count); random: the tokens the seeded `random` baseline keeps; cls-attention: the
    `count` highest CLS-attention scores (equal scores -> lower index).
    """
    priority = sampler_priority(num_tokens, count, sampler, seed, cls_scores)
    if sampler == "uniform":
        return uniform_baseline.indices(num_tokens, count)
    batched = priority if priority.dim() == 2 else priority.unsqueeze(0)
    kept = select_indices(batched, count)
    return kept if priority.dim() == 2 else kept[0]


def _is_representative(rep_indices: Tensor, num_tokens: int) -> Tensor:
    """(B, R) indices -> (B, N, R) bool: token n is representative number r."""
    tokens = torch.arange(num_tokens, device=rep_indices.device)
    return rep_indices.unsqueeze(1) == tokens.view(1, -1, 1)


@accepts_unbatched(batched_dims=3, tensor_args=2)
def nearest_representative(embeds: Tensor, rep_indices: Tensor) -> Tensor:
    """(B, N, D) token embeddings, (B, R) representative indices -> (B, N) int64 position 0..R-1 (in rep_indices)
    of each token's representative: the highest float32 cosine of embeddings, ties to the lower position. A
    representative always maps to its own position (the lower one if it is listed twice), even when another
    representative has the same embedding."""
    rep_indices = rep_indices.to(torch.int64)
    unit = torch.nn.functional.normalize(embeds.to(torch.float32), dim=-1, eps=1e-12)
    cosine = unit @ gather_rows(unit, rep_indices).transpose(-1, -2)  # (B, N, R)
    own = _is_representative(rep_indices, embeds.shape[1])
    return torch.argmax(torch.where(own, torch.full_like(cosine, float("inf")), cosine), dim=-1)


@accepts_unbatched(batched_dims=3, tensor_args=3)
def representative_update(embeds: Tensor, rep_indices: Tensor, rep_hidden: Tensor) -> Tensor:
    """(B, N, D) embeddings, (B, R) representative indices, (B, R, D) representatives' hidden states after the
    skipped layers -> (B, N, D) every token's state, in rep_hidden's dtype (readmit=representative).

    A token gets its own embedding plus the update its nearest representative received (hidden - embedding);
    a representative gets exactly its rep_hidden row.
    """
    rep_indices = rep_indices.to(torch.int64)
    nearest = nearest_representative(embeds, rep_indices)  # (B, N)
    own_embeds = embeds.to(rep_hidden.dtype)
    delta = rep_hidden - gather_rows(own_embeds, rep_indices)  # (B, R, D)
    updated = own_embeds + gather_rows(delta, nearest)
    is_rep = _is_representative(rep_indices, embeds.shape[1]).any(dim=-1, keepdim=True)  # (B, N, 1)
    return torch.where(is_rep, gather_rows(rep_hidden, nearest), updated)


def representatives_from_signals(signals: PrefillSignals, keep: int, params: dict[str, Any], count: int) -> Tensor:
    """The clustering prune at layer 0: the sampler's priorities over the image tokens (cls-attention: the vision
    graph's CLS row, handed to the prefill as its guide)."""
    batch, num_tokens = signals.image_embeds.shape[:2]
    priority = sampler_priority(num_tokens, count, params["sampler"], params["seed"], signals.guide)
    return priority.to(signals.image_embeds.device).expand(batch, num_tokens)


METHOD = LVLM_CSP  # declared in tpc.methods.registry; its transitions name `representatives_from_signals`
