"""Model pass: the one static-cache rewrite of a Llama-family decoder, for VLMs and policies alike.

Which image tokens each layer sees is the method's token schedule (`tpc.methods.schedule`): the prefill runs the
layers in order and applies each transition where it falls — a *prune* scores the image tokens present from the
taps on the layer before it and keeps K of them (the shared select op), a *re-admit* brings every image token
back, one dropped earlier with the hidden state it had when it was dropped. Text tokens are never dropped, image
tokens stay in original order and keep their original position ids, so each layer's KV cache holds exactly the
tokens it saw and its length is static (`DecoderLayout`).

The cache is explicit tensors of static size: layer i's cache holds `capacity[i]` positions (its prefill length
plus the decode steps). The prefill returns what it recorded (`RecordingCache`); `padded_cache` appends zero slots;
a static decode step s writes slot len_i + s (a `where` against a one-hot position, an elementwise op every runtime
has) and attends to slots 0..len_i+s. A policy's control step instead unrolls its few decode steps on the growing
recorded cache inside one graph (`decode_growing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tpc.methods.base import PrefillMethod
from tpc.methods.schedule import ALL_ROWS, SPAN_ROWS, PrefillSignals, Prune, TapSpec, TokenSchedule, Transition
from tpc.models_zoo.llava import DecoderParts
from tpc.ops import gather_tokens, select_indices
from tpc.passes.attention_tap import LastRowAttention, ReceivedAttention, SpanAttention, Tap, attach_tap


@dataclass(frozen=True)
class DecoderLayout:
    """The static prompt and cache of a decoder export, per layer, all derived from the token schedule."""

    image_start: int  # where the image tokens sit in the prompt
    text_tokens: int  # prompt tokens that are not image tokens (BOS included)
    schedule: TokenSchedule  # schedule.image_tokens: image tokens the prefill receives
    num_layers: int
    decode_steps: int  # decode calls the cache has room for

    @property
    def image_tokens(self) -> int:
        return self.schedule.image_tokens

    @property
    def prefill_tokens(self) -> int:
        """The prompt length the prefill receives."""
        return self.text_tokens + self.schedule.image_tokens

    @property
    def kept_lengths(self) -> tuple[int, ...]:
        """Cache entries each layer holds after the prefill."""
        return self.schedule.lengths(self.text_tokens, self.num_layers)

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(length + self.decode_steps for length in self.kept_lengths)

    @property
    def next_position(self) -> int:
        """Position id of the first decoded token: original positions are kept, so the prefill's full length."""
        return self.prefill_tokens

    def span_at(self, span: tuple[int, int], layer: int) -> tuple[int, int]:
        """A span of text tokens (start, stop in the prompt the prefill receives) where it sits at `layer`: after
        the image, it moves with the image tokens present there."""
        start, stop = span
        image_end = self.image_start + self.image_tokens
        if not 0 <= start < stop <= self.prefill_tokens or (start < image_end and stop > self.image_start):
            raise ValueError(f"the span {span} is not a span of text tokens of the {self.prefill_tokens}-token prompt")
        shift = self.schedule.tokens_per_layer(self.num_layers)[layer] - self.image_tokens if start >= image_end else 0
        return start + shift, stop + shift

    def flops(self, decoder: Any, decode_tokens: int = 1) -> tuple[int, int]:
        """(prefill, decode) 2x multiply-adds: every layer at its own length (causal: on average half the prompt
        as context), and `decode_tokens` decode steps after it (`decoder`: the family's DecoderGeometry)."""
        lengths = self.kept_lengths
        prefill = decoder.head_flops(1) + sum(decoder.layer_flops(n, (n + 1) // 2) for n in lengths)
        decode = sum(
            decoder.head_flops(1) + sum(decoder.layer_flops(1, n + step) for n in lengths)
            for step in range(1, decode_tokens + 1)
        )
        return prefill, decode


class RecordingCache:
    """The cache protocol transformers' attention calls (`update`): records each layer's keys and values; a later
    call on the same layer appends to them (the growing cache of an unrolled decode)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        if layer_idx in self.entries:
            past_key, past_value = self.entries[layer_idx]
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        self.entries[layer_idx] = (key, value)
        return key, value


def padded_cache(cache: RecordingCache, free_slots: int) -> list[Tensor]:
    """Each layer's prefill keys and values followed by `free_slots` zero slots for the decode steps: the static
    cache (`present.*`, in `cache_names` order) that decode fills one slot per call."""
    present = []
    for index in sorted(cache.entries):
        for tensor in cache.entries[index]:
            pad = tensor.new_zeros((*tensor.shape[:2], free_slots, tensor.shape[3]))
            present.append(torch.cat([tensor, pad], dim=2))
    return present


class _StaticCache:
    """Static cache: writes the new key/value at each layer's slot and returns the whole buffer."""

    def __init__(self, past: tuple[Tensor, ...], slots: list[Tensor]) -> None:
        self.past = past
        self.slots = slots
        self.present: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        past_key, past_value = self.past[2 * layer_idx], self.past[2 * layer_idx + 1]
        positions = torch.arange(past_key.shape[2], device=key.device)
        here = (positions == self.slots[layer_idx]).view(1, 1, -1, 1)
        self.present[layer_idx] = (torch.where(here, key, past_key), torch.where(here, value, past_value))
        return self.present[layer_idx]


def _score_tap(spec: TapSpec, layout: DecoderLayout, layer: int) -> Tap:
    """The tap computing `spec`'s reduction at `layer` (a span is placed where its tokens sit at that layer)."""
    if spec.rows == ALL_ROWS:
        return ReceivedAttention(causal=True)
    if spec.rows == SPAN_ROWS:
        assert spec.span is not None  # the schedule checks a span goes with these rows
        return SpanAttention(*layout.span_at(spec.span, layer))
    return LastRowAttention()


class ScheduledDecoder(nn.Module):
    """A family's decoder run by a token schedule: `prefill`, `decode_static` and `decode_growing`.

    `method`: the method whose priorities the schedule's prunes use (None when the schedule has no prune).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: DecoderParts,
        layout: DecoderLayout,
        method: PrefillMethod | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.layout = layout
        self.method, self.params = method, params or {}
        self.num_layers = layout.num_layers
        layers = adapter.decoder_layers(model)
        self.taps: dict[int, Tap] = {}
        for layer, spec in layout.schedule.tapped_layers().items():
            self.taps[layer] = attach_tap(layers[layer].self_attn, _score_tap(spec, layout, layer))
        self.transitions: dict[int, list[Transition]] = {}
        for transition in layout.schedule.transitions:
            self.transitions.setdefault(transition.layer, []).append(transition)

    def run_layer(
        self, index: int, hidden: Tensor, rotary: tuple[Tensor, Tensor], mask: Tensor | None, cache: object
    ) -> Tensor:
        layer = self.adapter.decoder_layers(self.model)[index]
        output = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache, use_cache=True)
        return output[0] if isinstance(output, tuple) else output

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits of the last position only (all generation needs), in float32."""
        last = self.adapter.final_norm(self.model, hidden[:, -1:])
        return self.adapter.lm_head(self.model)(last)[:, 0].float()

    def prefill(
        self,
        hidden: Tensor,
        image_embeds: Tensor,
        forced_indices: Tensor | None = None,
        guide: Tensor | None = None,
    ) -> tuple[Tensor, RecordingCache, Tensor | None]:
        """Every layer over the prompt `hidden` (B, L, D), whose image tokens `image_embeds` sit at image_start,
        applying the schedule: (last hidden states, the recorded cache, kept_indices or None).

        `kept_indices` (B, sum of the prunes' K): each prune's kept tokens as original image-token indices,
        ascending, in schedule order; `forced_indices` of that shape replaces every selection (teacher forcing).
        `guide` (B, N): a stateful method's guide over the image tokens.
        """
        start, count = self.layout.image_start, self.layout.image_tokens
        batch, length = hidden.shape[:2]
        device = hidden.device
        before = torch.arange(start, device=device).expand(batch, start)
        after = torch.arange(start + count, length, device=device).expand(batch, -1)
        everything = torch.arange(count, device=device).expand(batch, count)
        present, all_present = everything, True  # original indices of the image tokens present
        # each image token's latest hidden state, for a re-admit
        bank: Tensor | None = image_embeds if self.layout.schedule.readmits else None
        rotary = self.adapter.rotary(self.model, hidden, torch.arange(length, device=device).expand(batch, length))
        cache, kept_runs, offset = RecordingCache(), [], 0
        for index in range(self.num_layers):
            for transition in self.transitions.get(index, []):
                before_count = present.shape[1]
                image = hidden[:, start : start + before_count]
                if bank is not None:  # the present tokens' states, for a later re-admit
                    index_grid = present[..., None].expand(-1, -1, bank.shape[-1])
                    bank = image if all_present else bank.scatter(1, index_grid, image.to(bank.dtype))
                if isinstance(transition, Prune):
                    if forced_indices is not None:
                        kept = forced_indices[:, offset : offset + transition.keep]
                    else:
                        kept = self._select(transition, index, image, present, all_present, image_embeds, guide, hidden)
                    offset += transition.keep
                    # where each kept token sits among the present ones (present is ascending)
                    local = kept if all_present else (present[:, None, :] < kept[:, :, None]).sum(dim=-1)
                    image, present, all_present = gather_tokens(image, local), kept, False
                    kept_runs.append(kept)
                else:  # re-admit: every image token, the dropped ones with their state when dropped
                    assert bank is not None  # kept whenever the schedule re-admits
                    image, present, all_present = bank.to(hidden.dtype), everything, True
                hidden = torch.cat([hidden[:, :start], image, hidden[:, start + before_count :]], dim=1)
            if index in self.transitions:
                positions = torch.cat([before, present + start, after], dim=1)  # original positions of the present
                rotary = self.adapter.rotary(self.model, hidden, positions)
            hidden = self.run_layer(index, hidden, rotary, None, cache)
        kept_indices = torch.cat(kept_runs, dim=1) if len(kept_runs) > 1 else (kept_runs[0] if kept_runs else None)
        return hidden, cache, kept_indices

    def _select(
        self,
        prune: Prune,
        layer: int,
        image: Tensor,
        present: Tensor,
        all_present: bool,
        image_embeds: Tensor,
        guide: Tensor | None,
        context: Tensor,
    ) -> Tensor:
        """The kept tokens of one prune, as original image-token indices (ascending)."""
        start, count = self.layout.image_start, present.shape[1]
        tapped = self.taps[layer - 1].latest() if layer > 0 else None  # layer 0: nothing was tapped yet
        scores = tapped[:, start : start + count] if tapped is not None else image.new_zeros(present.shape)
        previous = self.taps[layer - 2].latest()[:, start : start + count] if prune.previous else None
        embeds = image_embeds if all_present else gather_tokens(image_embeds, present)
        if guide is not None and not all_present:
            guide = guide.gather(1, present)
        signals = PrefillSignals(scores, embeds, guide, image, previous, context)
        method_priority = self.method.priority if self.method is not None else None
        priority = prune.priority or method_priority
        if priority is None:
            raise ValueError(f"the prune at layer {layer} has no priority function and the decoder no method")
        local = select_indices(priority(signals, prune.keep, self.params), prune.keep)
        return local if all_present else present.gather(1, local)

    def decode_static(self, input_ids: Tensor, step: Tensor, past: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
        """One greedy step on the static cache: (hidden states of the new token, present.* in cache_names order)."""
        hidden = self.adapter.embed_text(self.model, input_ids)
        positions = (step + self.layout.next_position).view(1, 1).expand(hidden.shape[0], 1)
        rotary = self.adapter.rotary(self.model, hidden, positions)
        slots = [step + length for length in self.layout.kept_lengths]
        cache = _StaticCache(past, slots)
        masks: dict[int, Tensor] = {}
        for index, capacity in enumerate(self.layout.capacities):
            if capacity not in masks:  # attend to the filled slots, the new one included
                visible = torch.arange(capacity, device=hidden.device) <= slots[index]
                masks[capacity] = visible.view(1, 1, 1, capacity)
            hidden = self.run_layer(index, hidden, rotary, masks[capacity], cache)
        return hidden, [tensor for index in range(self.num_layers) for tensor in cache.present[index]]

    def decode_growing(self, token: Tensor, step: int, cache: RecordingCache) -> Tensor:
        """Decode step `step` (1-based) of an unrolled loop on the recorded cache, which grows by one position."""
        hidden = self.adapter.embed_text(self.model, token[:, None])
        position = torch.full((hidden.shape[0], 1), self.layout.next_position + step - 1, device=hidden.device)
        rotary = self.adapter.rotary(self.model, hidden, position)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, rotary, None, cache)
        return hidden
