"""Model pass: attention taps that compute only the reductions a method consumes.

Research code asks the model for `output_attentions`: every layer falls back to eager attention and
materialises its (B, H, N, N) probabilities. HiPrune needs two numbers per patch from two layers. A tap is a
transformers attention function (registered as `tpc_tap` in `AttentionInterface`, so it sees Q and K after
every model-specific transform) that, for the tapped layers only, computes the layer output and the attention
received per key from the same softmax, block of query rows by block of query rows, so the full matrix never
exists. Every untapped layer keeps the fused SDPA kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

TAP_IMPLEMENTATION = "tpc_tap"
# A block of query rows holds at most this many attention probabilities (float32) at once.
DEFAULT_BLOCK_ELEMENTS = 16 * 1024 * 1024


class _Tap:
    """What every tap holds: the reduction of the layer's last prompt forward, read right after the layer ran."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def latest(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("the tapped layer has not run yet")
        return self.value


def _row_logits(rows: Tensor, key: Tensor, scaling: float) -> Tensor:
    """Some query rows' logits over every key, grouped-query heads repeated as the model's own attention does."""
    groups = rows.shape[1] // key.shape[1]
    keys = repeat_kv(key, groups) if groups > 1 else key
    return torch.matmul(rows, keys.transpose(-1, -2)) * scaling


def ones_row(probs: Tensor) -> Tensor:
    """(1, 1, 1, rows) ones: `ones_row(p) @ p` sums the rows of attention probabilities (B, H, rows, T) as a GEMV in
    every runtime. ONNX Runtime's ReduceSum over the middle axes is slow: (1, 16, 577, 577) took 100 ms, the GEMV 4 ms
    (CLIP ViT-L/14-336, one thread); 36 ms of a 200 ms Qwen2.5-VL tower at 448 px. 4-D, because coremltools
    mis-broadcasts a 1-D operand of a matmul."""
    return torch.ones(1, 1, 1, probs.shape[2], dtype=probs.dtype, device=probs.device)


class ReceivedAttention(_Tap):
    """Tap: mean over heads and over all query rows of softmax(QK^T * scale), per key -> (B, N_keys).

    Equal to `attn.mean(1).mean(1)` of the eager attention map (HiPrune's "attention received"; with `causal`, a
    decoder prompt's, where key j receives from rows >= j and the mean still counts every row, as VLA-Pruner's
    prefill criterion does). `value` holds the last prompt forward's result; the pruned model reads it right
    after the layer ran. A one-query call (a decode step) runs on SDPA and leaves `value` alone.
    """

    def __init__(self, block_elements: int = DEFAULT_BLOCK_ELEMENTS, causal: bool = False) -> None:
        super().__init__()
        self.block_elements = block_elements
        self.causal = causal

    def rows_per_block(self, batch: int, heads: int, queries: int, keys: int) -> int:
        return max(1, min(queries, self.block_elements // max(1, batch * heads * keys)))

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float,
    ) -> tuple[Tensor, None]:
        batch, heads, queries, _ = query.shape
        if queries == 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        groups = heads // key.shape[1]
        key, value = (repeat_kv(key, groups), repeat_kv(value, groups)) if groups > 1 else (key, value)
        keys = key.shape[-2]
        block = self.rows_per_block(batch, heads, queries, keys)
        key_t = key.transpose(-1, -2)
        key_index = torch.arange(keys, device=query.device)
        outputs = []
        received = query.new_zeros((batch, keys), dtype=torch.float32)
        for start in range(0, queries, block):
            logits = torch.matmul(query[:, :, start : start + block], key_t) * scaling
            if attention_mask is not None:
                logits = logits + attention_mask[:, :, start : start + block, :]
            elif self.causal:  # query i sits at key position keys - queries + i
                rows = torch.arange(start, min(start + block, queries), device=query.device) + keys - queries
                logits = logits.masked_fill(key_index > rows[:, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            outputs.append(torch.matmul(probs.to(value.dtype), value))
            # the rows summed as a GEMV (`ones_row`), then the heads
            received = received + torch.matmul(ones_row(probs), probs).sum(dim=(1, 2))
        self.value = received / (heads * queries)
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


class RowAttention(_Tap):
    """Tap: softmax(q_row K^T * scale) of one query row (default the last), mean over heads -> (B, N_keys): FastV's
    signal (the last prompt token's row), or a vision tower's CLS row (`row=0`, what LVLM_CSP samples by).

    The layer itself runs on SDPA; only one extra row of probabilities is computed. Grouped-query attention
    repeats the key heads as the model's own attention does. The last row of a causal prompt sees every key.
    By default decode steps (one query) are not scored; with `every_call` each call's row is appended to
    `rows` as well (VLA-Pruner's action attention: the prompt's last row, then every decode step's).
    """

    def __init__(self, every_call: bool = False, row: int = -1) -> None:
        super().__init__()
        self.every_call = every_call
        self.row = row
        self.rows: list[Tensor] = []

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float,
    ) -> tuple[Tensor, None]:
        if query.shape[2] == 1 and not self.every_call:  # a decode step: one query, no prompt row to score
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)
        row = self.row % query.shape[2]
        logits = _row_logits(query[:, :, row : row + 1], key, scaling)
        if attention_mask is not None:  # its row (a mask may broadcast one row over every query)
            mask_row = self.row % attention_mask.shape[2]
            mask = attention_mask[:, :, mask_row : mask_row + 1, :]
            # boolean: True where it may attend (a static cache); otherwise additive
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        self.value = torch.softmax(logits, dim=-1, dtype=torch.float32)[:, :, 0].mean(dim=1)
        if self.every_call:
            self.rows.append(self.value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)


class SpanAttention(_Tap):
    """Tap: mean over heads and over the query rows `start..stop-1` of the causal softmax(QK^T * scale), per key ->
    (B, N_keys): what the rows of a token span (a question, a shot's text) attend to. The layer runs on SDPA; only
    the span's rows of probabilities are computed. A decode step (one query) is not scored.
    """

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def __call__(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float,
    ) -> tuple[Tensor, Tensor | None]:
        queries, keys = query.shape[2], key.shape[2]
        if queries == 1:
            return _sdpa(module, query, key, value, attention_mask, scaling=scaling)
        logits = _row_logits(query[:, :, self.start : self.stop], key, scaling)
        # query i sits at key position keys - queries + i, and sees the keys up to it
        positions = torch.arange(self.start, self.stop, device=query.device) + keys - queries
        logits = logits.masked_fill(torch.arange(keys, device=query.device) > positions[:, None], float("-inf"))
        self.value = torch.softmax(logits, dim=-1, dtype=torch.float32).mean(dim=(1, 2))
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling)


Tap = ReceivedAttention | RowAttention | SpanAttention


def _tap_or_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[Tensor, Tensor | None]:
    tap: Tap | None = getattr(module, "tpc_tap", None)
    if tap is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return tap(module, query, key, value, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)


AttentionInterface.register(TAP_IMPLEMENTATION, _tap_or_sdpa)
# transformers' SDPA function, called with the keyword arguments transformers itself passed to the dispatcher
_sdpa: Callable[..., tuple[Tensor, Tensor | None]] = sdpa_attention_forward


T = TypeVar("T", bound=ReceivedAttention | RowAttention | SpanAttention)


def insert_taps(attention_modules: Mapping[int, Any], make_tap: Callable[[], T]) -> dict[int, T]:
    # attention_modules: each family's attention class (LlamaAttention, CLIPAttention, ...), with its `config`
    """Attach a tap to each given attention module (keyed by layer) and route the model through `tpc_tap`.

    The attention config is shared by every layer of the stack, so untapped layers go through the same
    dispatcher and land on SDPA.
    """
    taps: dict[int, T] = {}
    for layer, attention in attention_modules.items():
        taps[layer] = attach_tap(attention, make_tap())
    return taps


def attach_tap(attention: Any, tap: T) -> T:
    """Route one attention module (and, through its shared config, its stack) through `tpc_tap`, tapped by `tap`."""
    attention.config._attn_implementation = TAP_IMPLEMENTATION
    attention.tpc_tap = tap
    return tap
