"""The static-budget token-select op: the single place where tpc drops tokens.

Every method reduces to "priority scores (B, N) -> keep the K best tokens", so they all share this op, and a
target lowers one op instead of one per method (ONNX: TopK + ascending TopK + Gather; TensorRT: one plugin).

Ranking rule, identical in eager and in every export:
    higher score first; equal scores -> lower index first; NaN below every number; +-inf are ordinary values.
The kept indices come out ascending (raster order), because that is the order the reference methods hand
tokens to the LLM.

How the rule survives export: scores are mapped to a float64 key in which NaN < -inf < every finite value
(NaN -> -inf, -inf -> 2 * float32.min, finite in float64). Keys are then totally ordered except for exact
ties, which ONNX's TopK resolves to the lower index by specification. The ascending re-order is a second
TopK on the (unique) indices: `torch.sort` exports, but ExecuTorch's runtime has no sort kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch._ops import OperatorBase

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT32_MIN = float(torch.finfo(torch.float32).min)


def check_select_args(scores: Tensor, tokens: Tensor, k: int) -> None:
    """Shape and budget checks shared by the eager kernel and the decomposition."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, tokens), got shape {tuple(scores.shape)}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scores must be float16, bfloat16 or float32, got {scores.dtype}")
    if tokens.dim() != 3 or tokens.shape[:2] != scores.shape:
        raise ValueError(
            f"tokens must be (batch, tokens, dim) matching scores {tuple(scores.shape)}, got {tuple(tokens.shape)}"
        )
    n = scores.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"keep must be an integer in [1, {n}] (the number of tokens), got {k!r}")


def ranking_key(scores: Tensor) -> Tensor:
    """float64 key with NaN < -inf < finite < +inf; order-preserving for every non-NaN float32 score."""
    key = scores.to(torch.float64)
    # 2 * float32.min: finite in float64, below every float32 value. Built by a float64 multiply because the
    # ONNX exporter stores a fill value as float32, where the product itself would overflow to -inf.
    below_every_float32 = torch.full_like(key, _FLOAT32_MIN) * 2.0
    key = torch.where(key == float("-inf"), below_every_float32, key)
    return torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, N, D) at indices (B, K) -> (B, K, D), as one flat Gather (axis 0) in every export."""
    b, n, d = tokens.shape
    offsets = torch.arange(b, device=indices.device).unsqueeze(1) * n
    flat = tokens.reshape(b * n, d).index_select(0, (indices + offsets).reshape(-1))
    return flat.reshape(b, indices.shape[1], d)


def in_spans(positions: Tensor, spans: tuple[tuple[int, int], ...]) -> Tensor:
    """positions (B, L) -> (B, L) bool: inside one of the (start, stop) spans. Logical ops, not `&` / `|`, which
    Core ML's converter lacks; fixed shapes, so a prompt's pieces are found by position without boolean indexing."""
    inside = torch.zeros_like(positions, dtype=torch.bool)
    for start, stop in spans:
        inside = torch.logical_or(inside, torch.logical_and(positions >= start, positions < stop))
    return inside


def ascending(indices: Tensor) -> Tensor:
    """Unique indices in ascending order without a sort kernel: a smallest-K TopK over K distinct ints."""
    return torch.topk(indices, indices.shape[-1], dim=-1, largest=False, sorted=True).values


@torch.library.custom_op("tpc::select_tokens", mutates_args=())
def select_tokens(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k best tokens: (kept_indices (B, k) int64 ascending, kept_tokens (B, k, D)).

    Eager kernel: a stable descending argsort is the reference definition of the tie rule.
    """
    check_select_args(scores, tokens, k)
    order = torch.argsort(ranking_key(scores), dim=-1, descending=True, stable=True)[:, :k]
    indices = ascending(order)
    return indices, gather_tokens(tokens, indices)


@select_tokens.register_fake
def _select_tokens_fake(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    check_select_args(scores, tokens, k)
    indices = scores.new_empty((scores.shape[0], k), dtype=torch.int64)
    return indices, tokens.new_empty((tokens.shape[0], k, tokens.shape[2]))


def kept_indices(scores: Tensor, k: int) -> Tensor:
    """TopK on the ranking key (ties -> lower index, as ONNX specifies and ExecuTorch's kernel does), ascending."""
    return ascending(torch.topk(ranking_key(scores), k, dim=-1, largest=True, sorted=True).indices)


def tie_free_kept_indices(scores: Tensor, k: int) -> Tensor:
    """`kept_indices` for runtimes whose TopK breaks ties in no documented order (ExecuTorch's portable kernel
    returns [3, 4, 5] for the top 3 of seven zeros). The K-th largest key does not depend on tie order; every
    token above it gets priority N + (N - i), every token equal to it N - i, the rest 0. The priorities of the
    tokens the rule keeps are distinct and above all others, so any TopK over them picks the same set."""
    key = ranking_key(scores)
    n = key.shape[-1]
    threshold = torch.topk(key, k, dim=-1, largest=True, sorted=True).values[:, k - 1 : k]
    earlier_first = n - torch.arange(n, device=key.device)  # n .. 1: the lower index ranks higher
    priority = torch.where(
        key > threshold,
        earlier_first + n,
        torch.where(key == threshold, earlier_first, torch.zeros_like(earlier_first)),
    )
    return ascending(torch.topk(priority, k, dim=-1, largest=True, sorted=True).indices)


def gather_rows(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, N, D) at indices (B, K) -> (B, K, D) by `gather` on dim 1: the float tokens are not reshaped."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def select_tokens_decomposition(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The op in ATen terms for ONNX: TopK + ascending TopK + one flat Gather (axis 0)."""
    check_select_args(scores, tokens, k)
    indices = kept_indices(scores, k)
    return indices, gather_tokens(tokens, indices)


def select_tokens_gather_decomposition(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The op for ExecuTorch: tie-free TopK (see `tie_free_kept_indices`) + ascending TopK + `gather`. The flat
    form reshapes the float tokens first, and XNNPACK takes that reshape as an island of its own between
    portable kernels (one more island per select, measured in benchmarks/executorch_islands.py); here every op
    of the select stays in one portable run."""
    check_select_args(scores, tokens, k)
    indices = tie_free_kept_indices(scores, k)
    return indices, gather_rows(tokens, indices)


def float32_kept_indices(scores: Tensor, k: int) -> Tensor:
    """`kept_indices` in float32 and int32 arithmetic only, whatever TopK does with ties: for TensorRT, which has
    no float64 (the ranking key's dtype) and documents no tie order for its TopK.

    NaN becomes -inf, so the K-th largest value `threshold` is well defined; tokens above it are kept; of the
    tokens equal to it, numbers rank before NaNs (NaN is below -inf) and each group by index, by running counts;
    the first `K - above` of them are kept. A second TopK over `N - i` at the kept tokens (0 elsewhere; distinct,
    exact in float32 for N < 2**24) returns them in ascending order."""
    score = scores.float()
    nan = torch.isnan(score)
    key = torch.where(nan, torch.full_like(score, float("-inf")), score)
    threshold = torch.topk(key, k, dim=-1, largest=True, sorted=True).values[:, k - 1 : k]
    above, tied = key > threshold, key == threshold
    # running counts in float32 (exact below 2**24; TensorRT's CumSum takes float types)
    tied_numbers, tied_nans = (tied & ~nan).to(torch.float32), (tied & nan).to(torch.float32)
    numbers_first = torch.cumsum(tied_numbers, dim=-1) - 1
    nans_after = tied_numbers.sum(dim=-1, keepdim=True) + torch.cumsum(tied_nans, dim=-1) - 1
    room = k - above.to(torch.float32).sum(dim=-1, keepdim=True)
    kept = above | (tied & (torch.where(nan, nans_after, numbers_first) < room))
    n = score.shape[-1]
    earlier_first = (n - torch.arange(n, device=score.device)).to(torch.float32)
    priority = torch.where(kept, earlier_first, torch.zeros_like(earlier_first))
    return torch.topk(priority, k, dim=-1, largest=True, sorted=True).indices


def select_tokens_float32_decomposition(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The op for TensorRT's native path: TopK (threshold) + TopK (ascending kept) + Gather, float32/int32 only."""
    check_select_args(scores, tokens, k)
    indices = float32_kept_indices(scores, k)
    return indices, gather_tokens(tokens, indices)


SelectLowering = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]  # the op in ATen terms
LOWERINGS: dict[str, SelectLowering] = {
    "flat": select_tokens_decomposition,  # ONNX Runtime
    "gather": select_tokens_gather_decomposition,  # ExecuTorch
    "float32": select_tokens_float32_decomposition,  # TensorRT
}


def select_indices(scores: Tensor, k: int) -> Tensor:
    """Indices only (the token gather is dead code and disappears from the exported graph)."""
    return select_tokens(scores, scores.unsqueeze(-1), k)[0]


def decompositions(lowering: str = "flat") -> dict[OperatorBase, SelectLowering]:
    """Decomposition table that `ExportedProgram.run_decompositions` takes to lower tpc's ops to ATen; `lowering`
    names one of `LOWERINGS` (`flat` for ONNX, `gather` for ExecuTorch, `float32` for TensorRT)."""
    return {torch.ops.tpc.select_tokens.default: LOWERINGS[lowering]}
