"""Model pass: a LLaVA-style VLM as the three graphs it is deployed as — vision, prefill, decode.

The KV cache is explicit tensors of static size: layer i's cache holds `capacity[i]` positions (its prefill
length plus the decode steps). Prefill writes positions 0..len_i-1 and pads the rest with zeros; decode step s
writes slot len_i + s (a `where` against a one-hot position, an elementwise op every runtime has) and attends
to slots 0..len_i+s. Every shape is fixed by the configuration; only `step`'s value changes between calls.

FastV prunes inside the prefill: layers 0..K-1 run on the whole prompt, a tap on layer K-1 reads the last
token's attention row, the select op keeps `keep` image tokens, and layers K.. run on text + kept tokens with
their original position ids, so their caches hold only the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from tpc.contract.names import KEPT_INDICES, cache_names
from tpc.methods import PrefillMethod, PrefillSignals
from tpc.models_zoo import LlavaAdapter
from tpc.ops import gather_tokens, select_indices
from tpc.passes.attention_tap import LastRowAttention, insert_taps
from tpc.passes.prune_vision import PrunedVisionEncoder


@dataclass(frozen=True)
class CacheLayout:
    """Static sizes of the prompt and the cache, per decoder layer."""

    image_start: int
    image_tokens: int  # image positions the prefill receives (K for vision-side pruning, all for FastV)
    prefill_tokens: int  # prompt length the prefill receives
    kept_lengths: tuple[int, ...]  # cache entries each layer holds after the prefill
    decode_steps: int  # decode calls the cache has room for
    next_position: int  # position id of the first decoded token (original positions are preserved)

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(length + self.decode_steps for length in self.kept_lengths)


class VisionComponent(nn.Module):
    """pixel_values -> image_embeds (B, K, D_text): the pruned tower, then the projector on the kept tokens only."""

    input_names = ("pixel_values",)
    output_names = ("image_embeds", KEPT_INDICES)

    def __init__(self, tower: PrunedVisionEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept_features, kept_indices = self.tower(pixel_values, forced_indices)
        return self.projector(kept_features), kept_indices


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


class _DecodeCache:
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


class _Decoder(nn.Module):
    """What prefill and decode share: the model, the adapter, the static layout."""

    def __init__(self, model: PreTrainedModel, adapter: LlavaAdapter, layout: CacheLayout) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.layout = layout
        self.num_layers = len(adapter.decoder_layers(model))

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


class PrefillComponent(_Decoder):
    """input_ids (B, L) + image_embeds (B, N_img, D) -> logits (B, V), present.* [, kept_indices (B, K)].

    The image embeddings replace the image-token positions [image_start, image_start + N_img), as
    transformers' `masked_scatter` does for a prompt whose image tokens sit there (the runtime checks that).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: LlavaAdapter,
        layout: CacheLayout,
        method: PrefillMethod | None = None,
        keep: int = 0,
        params: dict | None = None,
    ) -> None:
        super().__init__(model, adapter, layout)
        self.method, self.keep, self.params = method, keep, params or {}
        self.prune_layer = method.prune_layer(self.params) if method is not None else None
        self.input_names = ("input_ids", "image_embeds")
        self.output_names = ("logits", *cache_names("present", self.num_layers))
        if self.prune_layer is not None:
            self.output_names += (KEPT_INDICES,)
            layers = adapter.decoder_layers(model)
            self.taps = insert_taps({self.prune_layer - 1: layers[self.prune_layer - 1].self_attn}, LastRowAttention)

    def forward(
        self, input_ids: Tensor, image_embeds: Tensor, forced_indices: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        start, count = self.layout.image_start, image_embeds.shape[1]
        text = self.adapter.embed_text(self.model, input_ids)
        hidden = torch.cat([text[:, :start], image_embeds.to(text.dtype), text[:, start + count :]], dim=1)
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
        rotary = self.adapter.rotary(self.model, hidden, positions)
        cache, kept = RecordingCache(), None
        for index in range(self.num_layers):
            if index == self.prune_layer:
                kept = self._select(image_embeds, forced_indices)
                text_before = torch.arange(start, device=hidden.device).expand(hidden.shape[0], start)
                text_after = torch.arange(start + count, hidden.shape[1], device=hidden.device)
                sequence = torch.cat([text_before, kept + start, text_after.expand(hidden.shape[0], -1)], dim=1)
                hidden = gather_tokens(hidden, sequence)
                rotary = self.adapter.rotary(self.model, hidden, sequence)  # original positions of the kept
            hidden = self.run_layer(index, hidden, rotary, None, cache)
        outputs = (self.logits(hidden), *padded_cache(cache, self.layout.decode_steps))
        return (*outputs, kept) if kept is not None else outputs

    def _select(self, image_embeds: Tensor, forced_indices: Tensor | None) -> Tensor:
        if forced_indices is not None:
            return forced_indices
        start, count = self.layout.image_start, self.layout.image_tokens
        last_row = self.taps[self.prune_layer - 1].value[:, start : start + count]
        priority = self.method.priority(PrefillSignals(last_row, image_embeds), self.keep, self.params)
        return select_indices(priority, self.keep)


class DecodeComponent(_Decoder):
    """input_ids (B, 1) + step (1,) + past.* -> logits (B, V), present.*: one greedy step on the static cache."""

    def __init__(self, model: PreTrainedModel, adapter: LlavaAdapter, layout: CacheLayout) -> None:
        super().__init__(model, adapter, layout)
        self.input_names = ("input_ids", "step", *cache_names("past", self.num_layers))
        self.output_names = ("logits", *cache_names("present", self.num_layers))

    def forward(self, input_ids: Tensor, step: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        hidden = self.adapter.embed_text(self.model, input_ids)
        positions = (step + self.layout.next_position).view(1, 1).expand(hidden.shape[0], 1)
        rotary = self.adapter.rotary(self.model, hidden, positions)
        slots = [step + length for length in self.layout.kept_lengths]
        cache = _DecodeCache(past, slots)
        masks: dict[int, Tensor] = {}
        for index, capacity in enumerate(self.layout.capacities):
            if capacity not in masks:  # attend to the filled slots, the new one included
                visible = torch.arange(capacity, device=hidden.device) <= slots[index]
                masks[capacity] = visible.view(1, 1, 1, capacity)
            hidden = self.run_layer(index, hidden, rotary, masks[capacity], cache)
        present = [tensor for index in range(self.num_layers) for tensor in cache.present[index]]
        return (self.logits(hidden), *present)
