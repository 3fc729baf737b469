"""Model pass: one control step of an OpenVLA-style policy as one static graph.

A control step is a fixed amount of work: the towers and projector on the image, the prefill of BOS + image
tokens + the instruction prompt, then `action_dim - 1` greedy decode steps; its outputs are the action tokens.
All of it is one graph with the decode loop unrolled (the cache grows by one position per step, so every
shape is static), because a policy's unit of latency is the step and its state crosses steps, not tokens.

Pruning in the prefill (VLA-Pruner, FastV) is the method's token schedule, run by the same decoder rewrite as a
VLM's (`tpc.passes.decoder`): layers 0..K-1 see the full sequence, a tap on layer K-1 reduces its attention to the
semantic score, the method selects K image tokens, and layers K.. run on BOS + kept tokens + text with their
original position ids, so their caches hold only the kept tokens.

VLA-Pruner's state is explicit: the graph takes `history` (window, N) and returns `action_importance` (this
step's vector: the history layer's attention from the action-producing queries — the prompt's last row and
each decode step's row — to the kept image tokens, head mean, action mean, zeros at pruned tokens; a tap
records those rows) and `history_next` (the window shifted by one, this step's vector last).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tpc.contract.names import (
    ACTION_OUTPUT,
    HISTORY_INPUT,
    HISTORY_OUTPUT,
    IMPORTANCE_OUTPUT,
    INPUT_IDS,
    KEPT_INDICES,
    PIXEL_VALUES,
)
from tpc.methods import PrefillMethod
from tpc.methods.vla_pruner import GUIDE_DTYPES, guide_from_history
from tpc.models_zoo import OpenVlaAdapter
from tpc.models_zoo.openvla import OpenVlaForActionPrediction
from tpc.passes.attention_tap import RowAttention, attach_tap
from tpc.passes.decoder import DecoderLayout, RecordingCache, ScheduledDecoder


class PolicyStep(nn.Module):
    """pixel_values (1, 6, H, W) + input_ids (1, T) [+ history (window, N)] -> action_tokens (1, A)
    [, kept_indices (1, K)] [, action_importance (1, N), history_next (window, N)].

    `layout.schedule`: which image tokens each layer sees (no transition: every image token is kept, the unpruned
    policy and VLA-Pruner's warm-up steps); `method`: whose priorities its prunes use. `history_layer`: record the
    action attention there and carry the history.
    """

    def __init__(
        self,
        model: OpenVlaForActionPrediction,
        adapter: OpenVlaAdapter,
        layout: DecoderLayout,
        method: PrefillMethod | None,
        params: dict[str, Any],
        history_layer: int | None,
    ) -> None:
        super().__init__()
        self.decoder = ScheduledDecoder(model, adapter, layout, method, params)
        self.model, self.adapter, self.layout = model, adapter, layout
        self.method = method if layout.schedule.prunes else None
        self.params = params
        self.num_layers = layout.num_layers
        self.keep = layout.schedule.final_tokens
        self.action_dim = layout.decode_steps + 1
        self.input_names: tuple[str, ...] = (PIXEL_VALUES, INPUT_IDS)
        self.output_names: tuple[str, ...] = (ACTION_OUTPUT,)
        self.history_tap: RowAttention | None = None
        if self.method is not None:
            self.output_names += (KEPT_INDICES,)
        if history_layer is not None:
            self.input_names += (HISTORY_INPUT,)
            self.output_names += (IMPORTANCE_OUTPUT, HISTORY_OUTPUT)
            layers = adapter.decoder_layers(model)
            self.history_tap = attach_tap(layers[history_layer].self_attn, RowAttention(every_call=True))

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
        decoder = self.decoder
        tokens = [decoder.logits(hidden).argmax(dim=-1)]
        for step in range(1, self.action_dim):
            tokens.append(decoder.logits(decoder.decode_growing(tokens[-1], step, cache)).argmax(dim=-1))
        outputs: tuple[Tensor, ...] = (torch.stack(tokens, dim=1),)
        if kept is not None:
            outputs += (kept,)
        if self.history_tap is not None:
            assert history is not None  # a graph that carries the history takes it as an input
            importance = self._importance(self.history_tap, kept)
            outputs += (importance, torch.cat([history[1:], importance[:1]], dim=0))
        return outputs

    def prefill(
        self, pixel_values: Tensor, input_ids: Tensor, history: Tensor | None, forced_indices: Tensor | None
    ) -> tuple[Tensor, RecordingCache, Tensor | None]:
        """The prompt (BOS, the image tokens, the rest) through the scheduled decoder: (hidden states, the cache,
        kept indices)."""
        image = self.model.image_embeddings(pixel_values)
        text = self.adapter.embed_text(self.model, input_ids)
        hidden = torch.cat([text[:, :1], image.to(text.dtype), text[:, 1:]], dim=1)
        guide = None
        if self.method is not None and self.method.stateful and forced_indices is None:
            assert history is not None  # a stateful method's graph takes the history
            dtype = GUIDE_DTYPES[self.params["guide_dtype"]]
            guide = guide_from_history(history, self.params["decay"], self.params["order"], dtype).float()
            guide = guide.expand(image.shape[0], -1)
        return self.decoder.prefill(hidden, image, forced_indices, guide)

    def _importance(self, history_tap: RowAttention, kept: Tensor | None) -> Tensor:
        """(B, N): the recorded rows' attention to the image tokens the last layers keep (cache slots 1..K), action
        mean, scattered to the image grid with zeros at pruned tokens."""
        num_image = self.layout.image_tokens
        per_token = torch.stack([row[:, 1 : 1 + self.keep] for row in history_tap.rows]).mean(dim=0)
        if kept is None:
            return per_token
        final = kept[:, kept.shape[1] - self.keep :]
        return torch.zeros(per_token.shape[0], num_image, dtype=per_token.dtype).scatter(1, final, per_token)
