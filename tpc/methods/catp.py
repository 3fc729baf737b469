"""CATP, Contextually Adaptive Token Pruning (arXiv 2508.07871): the method's math as pure tensor functions.

CATP prunes image tokens in two stages, for multi-image (in-context) prompts:

- Stage 1, before the LLM: keep, per image, the tokens that best *cover* the image (greedy facility location
  on the rescaled cosine similarity `sim^ = (cos + 1) / 2`) while staying *aligned* with the image's text
  (`lambda1 * sim^(token, mean text embedding)`). Coverage starts at 0 (our reading, ambiguity A2), so the
  first pick is the token with the largest total similarity to the image plus alignment.
- Stage 2, inside the LLM: score the context images' tokens by the attention they gain between two layers
  plus their cosine with the query's hidden states (`context_scores`), and the query image's tokens by their
  cosine with the kept context (`query_scores`); `select` keeps the best of each.

The greedy is K unrolled steps over fixed shapes (argmax with ties to the lower index, chosen tokens masked
with -inf), and every reduction here is a static-shape op (`masked_mean` instead of boolean indexing), so
torch.export / ONNX trace them into a static graph. All math runs in float32 whatever the input dtype; every
function takes batched (B, ...) tensors, or one unbatched item or numpy arrays (`accepts_unbatched`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpc.methods.base import accepts_unbatched
from tpc.methods.registry import CATP
from tpc.methods.schedule import PrefillSignals
from tpc.ops import in_spans, select_indices

_EPS = 1e-12  # torch.nn.functional.normalize's default: a zero vector stays zero (cosine 0), never NaN


def _unit(x: Tensor) -> Tensor:
    """(..., D) -> float32 unit vectors along the last dimension."""
    return torch.nn.functional.normalize(x.to(torch.float32), dim=-1, eps=_EPS)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B, M, D), (B, N, D) -> (B, M, N) plain cosine similarity in float32."""
    return _unit(a) @ _unit(b).transpose(-1, -2)


@accepts_unbatched(batched_dims=3, tensor_args=2)
def similarity(a: Tensor, b: Tensor) -> Tensor:
    """(B, M, D), (B, N, D) -> (B, M, N) the paper's rescaled cosine sim^ = (cos + 1) / 2, in [0, 1] (A1)."""
    return (_cosine(a, b) + 1.0) / 2.0


@accepts_unbatched(batched_dims=3, tensor_args=2)
def stage1_order(image_embeds: Tensor, text_embeds: Tensor, keep: int, lambda1: float = 0.7) -> Tensor:
    """(B, S, D) image tokens, (B, T, D) text tokens -> (B, keep) int64 token indices in the order stage 1 picks
    them; (S, D), (T, D) -> (keep,).

    Each step picks argmax over unchosen c of sum_x max(0, sim^[c, x] - cover[x]) + lambda1 * sim^(c, text mean),
    ties to the lower index, then raises cover to max(cover, sim^[pick, :]).
    """
    batch, num_tokens, _ = image_embeds.shape
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep must be in [1, {num_tokens}] (the number of image tokens), got {keep}")
    text_mean = text_embeds.to(torch.float32).mean(dim=1, keepdim=True)  # (B, 1, D)
    sim = similarity(image_embeds, image_embeds)  # (B, S, S)
    align = similarity(image_embeds, text_mean)[..., 0]  # (B, S)
    bonus = lambda1 * align
    rows = torch.arange(batch, device=image_embeds.device)
    cover = torch.zeros_like(align)
    chosen = torch.zeros_like(align, dtype=torch.bool)
    minus_inf = torch.full_like(align, float("-inf"))
    picks = []
    for _ in range(keep):
        gain = (sim - cover.unsqueeze(1)).clamp(min=0).sum(dim=-1) + bonus
        pick = torch.argmax(torch.where(chosen, minus_inf, gain), dim=-1)  # the first maximal index
        picks.append(pick)
        cover = torch.maximum(cover, sim[rows, pick])
        chosen = torch.logical_or(chosen, torch.nn.functional.one_hot(pick, num_tokens).bool())
    return torch.stack(picks, dim=-1)


@accepts_unbatched(batched_dims=3, tensor_args=2)
def stage1_priority(image_embeds: Tensor, text_embeds: Tensor, keep: int, lambda1: float = 0.7) -> Tensor:
    """(B, S) float32 priorities whose top-`keep` is stage 1's pick set: keep - rank at picked tokens, 0 elsewhere."""
    order = stage1_order(image_embeds, text_embeds, keep, lambda1)
    rank_value = torch.arange(keep, 0, -1, device=order.device, dtype=torch.float32).expand_as(order)
    return torch.zeros(image_embeds.shape[:2], device=order.device).scatter(1, order, rank_value)


@accepts_unbatched(batched_dims=3, tensor_args=2)
def stage1(image_embeds: Tensor, text_embeds: Tensor, keep: int, lambda1: float = 0.7) -> Tensor:
    """(B, S, D), (B, T, D) -> (B, keep) stage 1's kept indices, int64, ascending; unbatched -> (keep,)."""
    return select_indices(stage1_priority(image_embeds, text_embeds, keep, lambda1), keep)


@accepts_unbatched(batched_dims=2, tensor_args=4)
def context_scores(
    attn_prev: Tensor, attn_cur: Tensor, context_hidden: Tensor, query_hidden: Tensor, lambda2: float = 0.6
) -> Tensor:
    """Stage 2 score of context-image tokens -> (B, N) float32.

    attn_prev, attn_cur (B, N): attention each token receives at the earlier and the current layer; only its
    growth counts (clamped at 0). context_hidden (B, N, D), query_hidden (B, Q, D): plus lambda2 times the plain
    cosine (not rescaled) of each token's hidden state with the mean query hidden state.
    """
    growth = (attn_cur.to(torch.float32) - attn_prev.to(torch.float32)).clamp(min=0)
    query_mean = query_hidden.to(torch.float32).mean(dim=1, keepdim=True)  # (B, 1, D)
    return growth + lambda2 * _cosine(context_hidden, query_mean)[..., 0]


@accepts_unbatched(batched_dims=3, tensor_args=2)
def query_scores(query_image_hidden: Tensor, kept_context_hidden: Tensor) -> Tensor:
    """(B, M, D) query-image tokens, (B, C, D) kept context tokens -> (B, M) float32: each query token's plain
    cosine with the mean kept context hidden state."""
    context_mean = kept_context_hidden.to(torch.float32).mean(dim=1, keepdim=True)  # (B, 1, D)
    return _cosine(query_image_hidden, context_mean)[..., 0]


@accepts_unbatched(batched_dims=2)
def select(scores: Tensor, keep: int) -> Tensor:
    """(B, N) scores -> (B, keep) int64 ascending through the shared select op (higher first, equal -> lower
    index); (N,) -> (keep,). Scores are ranked as float32."""
    return select_indices(scores.to(torch.float32), keep)


@accepts_unbatched(batched_dims=3, tensor_args=2)
def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) hidden states, (B, L) mask -> (B, 1, D) float32 mean of the masked rows, with static shapes
    (sum / count, the count clamped to >= 1 so an empty mask gives zeros): the model glue forms query_hidden and
    kept_context_hidden with it instead of boolean indexing."""
    weight = mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    total = (hidden.to(torch.float32) * weight).sum(dim=1, keepdim=True)
    return total / weight.sum(dim=1, keepdim=True).clamp(min=1.0)


# --- the schedule's priorities (tpc.methods.registry.CATP builds the transitions; see PrefillSignals) -----------


def _compared(signals: PrefillSignals, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(the whole sequence, the pruned images' present tokens) at the hidden state A4 names: entering the paper's
    layer K (tpc's layer K-1, whose attention A_K is) or its output (entering tpc's layer K)."""
    if params["hidden"] == "input":
        assert signals.previous_context is not None and signals.previous_hidden is not None, "a prune past layer 0"
        return signals.previous_context, signals.previous_hidden
    assert signals.context is not None and signals.hidden is not None
    return signals.context, signals.hidden


def stage1_from_signals(signals: PrefillSignals, keep: int, params: dict[str, Any], text: tuple[int, int]) -> Tensor:
    """Stage 1 of one image at layer 0: its projected tokens against the mean embedding of its text (`text`: the
    prompt span that follows the image)."""
    assert signals.context is not None and signals.positions is not None
    text_mean = masked_mean(signals.context, in_spans(signals.positions, (text,)))
    return stage1_priority(signals.image_embeds, text_mean, keep, params["lambda1"])


def context_from_signals(signals: PrefillSignals, keep: int, params: dict[str, Any], query_start: int) -> Tensor:
    """Stage 2 at layer K: every context image token present, against the query sample (the prompt from the query
    image on)."""
    assert signals.positions is not None and signals.previous_scores is not None
    context, hidden = _compared(signals, params)
    query = masked_mean(context, signals.positions >= query_start)
    return context_scores(signals.previous_scores, signals.scores, hidden, query, params["lambda2"])


def query_from_signals(
    signals: PrefillSignals, keep: int, params: dict[str, Any], context: tuple[tuple[int, int], ...]
) -> Tensor:
    """At layer K+1: the query image's tokens against the mean of the kept context (`context`: the spans whose
    present tokens it averages — the example images', or the whole context's, A6)."""
    assert signals.positions is not None
    sequence, hidden = _compared(signals, params)
    return query_scores(hidden, masked_mean(sequence, in_spans(signals.positions, context)))


METHOD = CATP  # declared in tpc.methods.registry; its transitions name the three priorities above
