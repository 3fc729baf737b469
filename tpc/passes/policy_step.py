"""Model pass: one control step of an OpenVLA-style policy as one static graph.

A control step is a fixed amount of work: the towers and projector on the image, the prefill of BOS + image
tokens + the instruction prompt, then `action_dim - 1` greedy decode steps; its outputs are the action tokens.
All of it is one graph with the decode loop unrolled (the cache grows by one position per step, so every
shape is static), because a policy's unit of latency is the step and its state crosses steps, not tokens.

Pruning in the prefill (VLA-Pruner, FastV): layers 0..K-1 see the full sequence, a tap on layer K-1 reduces
its attention to the semantic score, the method selects K image tokens, and layers K.. run on BOS + kept
tokens + text with their original position ids, so their caches hold only the kept tokens.

VLA-Pruner's state is explicit: the graph takes `history` (window, N) and returns `action_importance` (this
step's vector: the history layer's attention from the action-producing queries — the prompt's last row and
each decode step's row — to the kept image tokens, head mean, action mean, zeros at pruned tokens; a tap
records those rows) and `history_next` (the window shifted by one, this step's vector last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tpc.contract.names import ACTION_OUTPUT, HISTORY_INPUT, HISTORY_OUTPUT, IMPORTANCE_OUTPUT, KEPT_INDICES
from tpc.methods import PrefillMethod, PrefillSignals
from tpc.methods.base import ALL_ROWS
from tpc.methods.vla_pruner import GUIDE_DTYPES, guide_from_history
from tpc.models_zoo import OpenVlaAdapter
from tpc.models_zoo.openvla import OpenVlaForActionPrediction
from tpc.ops import gather_tokens, select_indices
from tpc.passes.attention_tap import LastRowAttention, ReceivedAttention, insert_taps
from tpc.passes.vlm_components import RecordingCache, _Decoder


@dataclass(frozen=True)
class StepLayout:
    """The static sequence of one step: BOS, `image_tokens` image tokens, then the rest of the prompt."""

    text_tokens: int  # prompt ids, BOS included
    image_tokens: int
    action_dim: int

    @property
    def prompt_length(self) -> int:
        return self.text_tokens + self.image_tokens

    def cache_lengths(self, keep: int, prune_layer: int | None, num_layers: int) -> tuple[int, ...]:
        """Each decoder layer's prompt length (its cache after the prefill) when `keep` image tokens are kept from
        `prune_layer` on (None: every layer sees the whole prompt)."""
        pruned = self.text_tokens + keep
        return tuple(
            self.prompt_length if prune_layer is None or index < prune_layer else pruned for index in range(num_layers)
        )


class PolicyStep(_Decoder):
    """pixel_values (1, 6, H, W) + input_ids (1, T) [+ history (window, N)] -> action_tokens (1, A)
    [, kept_indices (1, K)] [, action_importance (1, N), history_next (window, N)].

    `method`/`keep`: the prefill method that prunes (None: every image token is kept, the unpruned policy and
    VLA-Pruner's warm-up steps). `history_layer`: record the action attention there and carry the history.
    """

    def __init__(
        self,
        model: OpenVlaForActionPrediction,
        adapter: OpenVlaAdapter,
        layout: StepLayout,
        method: PrefillMethod | None,
        keep: int,
        params: dict[str, Any],
        history_layer: int | None,
    ) -> None:
        super().__init__(model, adapter, layout)
        self.method, self.keep, self.params = method, keep, params
        self.prune_layer = method.prune_layer(params) if method is not None else None
        layers = adapter.decoder_layers(model)
        self.input_names: tuple[str, ...] = ("pixel_values", "input_ids")
        self.output_names: tuple[str, ...] = (ACTION_OUTPUT,)
        self.score_tap: ReceivedAttention | LastRowAttention | None = None
        self.history_tap: LastRowAttention | None = None
        if method is not None:
            self.output_names += (KEPT_INDICES,)
            causal = method.score_rows(params) == ALL_ROWS
            score = self.prune_layer - 1
            make = (lambda: ReceivedAttention(causal=True)) if causal else LastRowAttention
            self.score_tap = insert_taps({score: layers[score].self_attn}, make)[score]
        if history_layer is not None:
            self.input_names += (HISTORY_INPUT,)
            self.output_names += (IMPORTANCE_OUTPUT, HISTORY_OUTPUT)
            rows = lambda: LastRowAttention(every_call=True)  # noqa: E731
            self.history_tap = insert_taps({history_layer: layers[history_layer].self_attn}, rows)[history_layer]

    @property
    def cache_lengths(self) -> tuple[int, ...]:
        return self.layout.cache_lengths(self.keep, self.prune_layer, self.num_layers)

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        history: Tensor | None = None,
        forced_indices: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        if self.history_tap is not None:
            self.history_tap.rows = []
        hidden, cache, kept = self.prefill(pixel_values, input_ids, history, forced_indices)
        tokens = [self.logits(hidden).argmax(dim=-1)]
        batch, length = hidden.shape[0], self.layout.prompt_length
        for step in range(1, self.layout.action_dim):
            hidden = self.adapter.embed_text(self.model, tokens[-1][:, None])
            position = torch.full((batch, 1), length + step - 1, device=hidden.device)
            rotary = self.adapter.rotary(self.model, hidden, position)
            for index in range(self.num_layers):
                hidden = self.run_layer(index, hidden, rotary, None, cache)
            tokens.append(self.logits(hidden).argmax(dim=-1))
        outputs: tuple[Tensor, ...] = (torch.stack(tokens, dim=1),)
        if kept is not None:
            outputs += (kept,)
        if self.history_tap is not None:
            importance = self._importance(kept)
            outputs += (importance, torch.cat([history[1:], importance[:1]], dim=0))
        return outputs

    def prefill(
        self, pixel_values: Tensor, input_ids: Tensor, history: Tensor | None, forced_indices: Tensor | None
    ) -> tuple[Tensor, RecordingCache, Tensor | None]:
        """Every decoder layer over the prompt, pruning at the prune layer: (hidden states, the cache, kept)."""
        image = self.model.image_embeddings(pixel_values)
        text = self.adapter.embed_text(self.model, input_ids)
        hidden = torch.cat([text[:, :1], image.to(text.dtype), text[:, 1:]], dim=1)
        batch, length = hidden.shape[:2]
        rotary = self.adapter.rotary(self.model, hidden, torch.arange(length, device=hidden.device).expand(batch, -1))
        cache, kept = RecordingCache(), None
        for index in range(self.num_layers):
            if index == self.prune_layer:
                kept = forced_indices if forced_indices is not None else self._select(image, history)
                bos = torch.zeros((batch, 1), dtype=kept.dtype, device=kept.device)
                text_after = torch.arange(1 + image.shape[1], length, device=kept.device).expand(batch, -1)
                sequence = torch.cat([bos, kept + 1, text_after], dim=1)
                hidden = gather_tokens(hidden, sequence)
                rotary = self.adapter.rotary(self.model, hidden, sequence)  # original positions of the kept
            hidden = self.run_layer(index, hidden, rotary, None, cache)
        return hidden, cache, kept

    def _select(self, image: Tensor, history: Tensor | None) -> Tensor:
        scores = self.score_tap.value[:, 1 : 1 + image.shape[1]]
        guide = None
        if self.method.stateful:
            dtype = GUIDE_DTYPES[self.params["guide_dtype"]]
            guide = guide_from_history(history, self.params["decay"], self.params["order"], dtype).float()
            guide = guide.expand_as(scores)
        priority = self.method.priority(PrefillSignals(scores, image, guide), self.keep, self.params)
        return select_indices(priority, self.keep)

    def _importance(self, kept: Tensor | None) -> Tensor:
        """(B, N): the recorded rows' attention to the kept image tokens (cache slots 1..K), action mean,
        scattered to the image grid with zeros at pruned tokens."""
        num_image = self.layout.image_tokens
        count = num_image if kept is None else kept.shape[1]
        per_token = torch.stack([row[:, 1 : 1 + count] for row in self.history_tap.rows]).mean(dim=0)
        if kept is None:
            return per_token
        return torch.zeros(per_token.shape[0], num_image, dtype=per_token.dtype).scatter(1, kept, per_token)
