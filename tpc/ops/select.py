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

import torch
from torch import Tensor

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


def select_tokens_decomposition(scores: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The op in ATen terms for export: TopK (ties -> lower index, as ONNX specifies) + ascending TopK + Gather."""
    check_select_args(scores, tokens, k)
    best = torch.topk(ranking_key(scores), k, dim=-1, largest=True, sorted=True).indices
    indices = ascending(best)
    return indices, gather_tokens(tokens, indices)


def select_indices(scores: Tensor, k: int) -> Tensor:
    """Indices only (the token gather is dead code and disappears from the exported graph)."""
    return select_tokens(scores, scores.unsqueeze(-1), k)[0]


def decompositions() -> dict:
    """Decomposition table that `ExportedProgram.run_decompositions` takes to lower tpc's ops to ATen."""
    return {torch.ops.tpc.select_tokens.default: select_tokens_decomposition}
