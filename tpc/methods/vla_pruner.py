"""VLA-Pruner (Liu et al., arXiv 2511.16449), the OpenVLA path of MINT-SJTU's main branch (docs/methods.md#vla-pruner).

In the decoder prefill of a VLA, keep K of the image tokens: the union of the top-K by the current semantic
score (layer k-1 attention) and the top-K by a temporally smoothed action attention from earlier control steps,
reduced to K by DivPrune's max-min diversity greedy on the LLM input embeddings when the union is larger.

Static form (§2.7): a 256-wide candidate mask replaces `unique(cat(...))`, and the greedy runs K fixed
iterations restricted to the candidates (`divprune.greedy_order(..., candidates=...)`). When the two top-K sets
coincide the greedy picks exactly them, so no branch on |U| is needed. Top-K ties: value desc, index asc.

State: `History` carries the last `window` action-importance vectors of an episode. Until it is full the
reference does not prune (warm-up, all tokens kept); `guide()` is then None.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tpc.methods import divprune
from tpc.methods.base import accepts_unbatched
from tpc.methods.registry import REFERENCE_HISTORY_LAYER, VLA_CRITERIA, VLA_GUIDE_DTYPES, VLA_ORDERS, VLA_PRUNER
from tpc.methods.schedule import PrefillSignals
from tpc.ops import select_indices

CRITERIA, ORDERS = VLA_CRITERIA, VLA_ORDERS


def semantic_scores(attn: Tensor, image_start: int, num_image: int, criterion: str = "prefill") -> Tensor:
    """(B, H, L, L) attention of layer k-1 -> (B, num_image): head mean, then the mean over all query rows
    ("prefill", the paper's S_vl) or the last row ("last", the FastV criterion); image columns only."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    heads_mean = attn.float().mean(dim=1)
    current = heads_mean.mean(dim=1) if criterion == "prefill" else heads_mean[:, -1]
    return current[:, image_start : image_start + num_image]


class History:
    """The temporal state: a ring of the last `window` action-importance vectors, and the guide they give.

    order "oldest-heaviest" (main branch, §2.4): weights [decay**(n-1), ..., decay, 1] from the newest vector
    to the oldest (0.64, 0.8, 1.0: the oldest weighs most, sic), the sum normalised to 1. "newest-heaviest"
    (OFT branch, §2.9): weights [1, decay, decay**2, ...] from the newest, divided by the weight sum. The guide
    is cast to `guide_dtype` (bfloat16, as the reference does; float32 keeps it exact).
    """

    def __init__(
        self,
        num_tokens: int = 256,
        window: int = 3,
        decay: float = 0.8,
        order: str = "oldest-heaviest",
        guide_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.num_tokens, self.window, self.decay, self.order, self.guide_dtype = (
            num_tokens,
            window,
            decay,
            order,
            guide_dtype,
        )
        self.vectors: deque[Tensor] = deque(maxlen=window)

    def reset(self) -> None:
        self.vectors.clear()

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def full(self) -> bool:
        return len(self.vectors) == self.window

    def push(self, vector: Tensor) -> None:
        vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if vector.numel() != self.num_tokens:
            raise ValueError(f"expected a ({self.num_tokens},) vector, got {tuple(vector.shape)}")
        self.vectors.append(vector.clone())

    def weights(self) -> Tensor:
        """Weights from the newest vector to the oldest (float32, as the reference's numpy list)."""
        return newest_first_weights(len(self.vectors), self.decay, self.order)

    def guide(self) -> Tensor | None:
        """(num_tokens,) guide in `guide_dtype`, or None while the history is not full (warm-up: no pruning)."""
        if not self.full:
            return None
        return guide_from_history(torch.stack(list(self.vectors)), self.decay, self.order, self.guide_dtype)


def newest_first_weights(count: int, decay: float, order: str) -> Tensor:
    """The smoothing weights of `count` vectors, newest first (float32)."""
    powers = range(count - 1, -1, -1) if order == "oldest-heaviest" else range(count)
    return torch.tensor([decay**i for i in powers], dtype=torch.float32)


def guide_from_history(history: Tensor, decay: float, order: str, dtype: torch.dtype) -> Tensor:
    """(..., W, N) vectors, oldest first -> (..., N) guide (§2.4; §2.9 for "newest-heaviest"), cast to `dtype`.

    The same function drives `History` and the exported step graph, which takes the history as an input."""
    window = history.shape[-2]
    weights = newest_first_weights(window, decay, order)
    guided = sum(weights[i] * history[..., window - 1 - i, :] for i in range(window))
    assert isinstance(guided, Tensor)  # window >= 1 vectors: a tensor, never sum()'s start 0
    total = pairwise_sum(guided).unsqueeze(-1) if order == "oldest-heaviest" else weights.sum()
    return (guided / total).to(dtype)


def pairwise_sum(values: Tensor) -> Tensor:
    """Sum over the last dimension in numpy's pairwise order (what the reference's float32 `np.sum` does).

    The guide is rounded to bfloat16 right after this normalisation, so a sum one float32 ulp off (as torch's
    own reduction order often is) can move a value across a bfloat16 rounding boundary. Static shapes only:
    blocks of 8 running sums up to 128 values, halves (at a multiple of 8) above that.
    """
    count = values.shape[-1]
    if count < 8:
        total = torch.zeros_like(values[..., 0])
        for i in range(count):
            total = total + values[..., i]
        return total
    if count <= 128:
        tail = count % 8
        blocks = values[..., : count - tail].reshape(*values.shape[:-1], -1, 8)
        r = blocks[..., 0, :]
        for i in range(1, blocks.shape[-2]):
            r = r + blocks[..., i, :]
        pairs = [r[..., 2 * j] + r[..., 2 * j + 1] for j in range(4)]
        total = (pairs[0] + pairs[1]) + (pairs[2] + pairs[3])
        for i in range(count - tail, count):
            total = total + values[..., i]
        return total
    half = count // 2 - (count // 2) % 8
    return pairwise_sum(values[..., :half]) + pairwise_sum(values[..., half:])


def top_mask(scores: Tensor, keep: int) -> Tensor:
    """(B, N) -> (B, N) bool: the top-`keep` (value desc, index asc on ties)."""
    kept = select_indices(scores.float(), keep)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(1, kept, True)


@accepts_unbatched(batched_dims=2, tensor_args=1)
def candidates(current_scores: Tensor, guide: Tensor, keep: int) -> Tensor:
    """(B, N) union of the two top-K sets (as a mask: the static `unique(cat(...))`)."""
    guide = torch.as_tensor(guide).float()
    guide = guide.expand_as(current_scores) if guide.dim() == 1 else guide
    return top_mask(current_scores, keep) | top_mask(guide, keep)


def greedy_order(
    current_scores: Tensor, guide: Tensor, image_embeds: Tensor, keep: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(B, keep) image indices in the order the diversity filter picks them from the union (distances in
    `dtype`: near-ties late in the order can swap two picks between float32 and exact arithmetic; the kept set
    does not change)."""
    union = candidates(current_scores, guide, keep)
    return divprune.greedy_order(image_embeds, keep, union, dtype)


def priority(current_scores: Tensor, guide: Tensor | None, image_embeds: Tensor, keep: int) -> Tensor:
    """(B, N) priorities whose top-`keep` is VLA-Pruner's kept set (all tokens equal in warm-up)."""
    if guide is None:
        return torch.zeros(current_scores.shape, device=current_scores.device)
    order = greedy_order(current_scores, guide, image_embeds, keep)
    rank_value = torch.arange(keep, 0, -1, device=order.device, dtype=torch.float32).expand_as(order)
    return torch.zeros(current_scores.shape, device=order.device).scatter(1, order, rank_value)


@accepts_unbatched(batched_dims=2, tensor_args=1)
def select(current_scores: Tensor, guide: Tensor | None, image_embeds: Tensor, keep: int) -> Tensor:
    """(B, N) scores + (N,) or (B, N) guide + (B, N, D) LLM input embeddings -> (B, keep) ascending kept
    image-token indices. Guide None (warm-up): every token is kept, (B, N)."""
    image_embeds = torch.as_tensor(image_embeds)
    if image_embeds.dim() == 2:
        image_embeds = image_embeds.unsqueeze(0)
    if guide is None:
        return torch.arange(current_scores.shape[-1]).expand(current_scores.shape)
    return select_indices(priority(current_scores, guide, image_embeds, keep), keep)


def action_importance(
    action_rows: Sequence[Tensor] | Tensor, kept_image_idx: Tensor, image_start: int, num_image: int
) -> Tensor:
    """The history vector of one step (§2.4 steps 2-3): the layer-15 attention rows of the action-producing
    queries over the kept sequence (each (H, L_kept + a), or stacked (A, H, L)), head mean then action mean,
    scattered to the image grid with exact zeros at tokens pruned in that step -> (num_image,) float32.

    The kept image tokens sit at positions image_start .. image_start + K - 1 of the kept sequence."""
    kept = torch.as_tensor(kept_image_idx).reshape(-1)
    count = kept.numel()
    columns = [torch.as_tensor(row).float()[:, image_start : image_start + count] for row in action_rows]
    per_token = torch.stack(columns).mean(dim=1).mean(dim=0)  # heads, then the action tokens
    return torch.zeros(num_image, dtype=torch.float32).scatter(0, kept, per_token)


GUIDE_DTYPES = dict(zip(VLA_GUIDE_DTYPES, (torch.bfloat16, torch.float32), strict=True))


def _priority(signals: PrefillSignals, keep: int, params: dict[str, Any]) -> Tensor:
    return priority(signals.scores, signals.guide, signals.image_embeds, keep)


METHOD = VLA_PRUNER  # declared in tpc.methods.registry; its priority is `_priority` above

__all__ = [
    "CRITERIA",
    "GUIDE_DTYPES",
    "METHOD",
    "ORDERS",
    "REFERENCE_HISTORY_LAYER",
    "History",
    "action_importance",
    "candidates",
    "greedy_order",
    "guide_from_history",
    "newest_first_weights",
    "pairwise_sum",
    "priority",
    "select",
    "semantic_scores",
    "top_mask",
]
