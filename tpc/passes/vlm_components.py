"""Model pass: a LLaVA-style VLM as the three graphs it is deployed as — vision, prefill, decode.

The prefill and decode graphs are two entry points of one `tpc.passes.decoder.ScheduledDecoder`, which runs the
method's token schedule: a vision-side method hands K image embeddings to the decoder (a schedule without
transitions); FastV prunes inside the prefill (one prune transition at its layer K). Every shape is fixed by the
configuration; only `step`'s value changes between decode calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tpc.contract.names import IMAGE_EMBEDS, INPUT_IDS, KEPT_INDICES, LOGITS, PIXEL_VALUES, STEP_INPUT, cache_names
from tpc.passes.decoder import ScheduledDecoder, padded_cache
from tpc.passes.prune_vision import PrunedVisionEncoder


class VisionComponent(nn.Module):
    """pixel_values -> image_embeds (B, K, D_text): the pruned tower, then the projector on the kept tokens only."""

    input_names = (PIXEL_VALUES,)
    output_names = (IMAGE_EMBEDS, KEPT_INDICES)

    def __init__(self, tower: PrunedVisionEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept_features, kept_indices = self.tower(pixel_values, forced_indices)
        return self.projector(kept_features), kept_indices


class PrefillComponent(nn.Module):
    """input_ids (B, L) + image_embeds (B, N_img, D) -> logits (B, V), present.* [, kept_indices].

    The image embeddings replace the image-token positions [image_start, image_start + N_img), as
    transformers' `masked_scatter` does for a prompt whose image tokens sit there (the runtime checks that).
    """

    def __init__(self, decoder: ScheduledDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.input_names = (INPUT_IDS, IMAGE_EMBEDS)
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers))
        if decoder.layout.schedule.prunes:
            self.output_names += (KEPT_INDICES,)

    def forward(
        self, input_ids: Tensor, image_embeds: Tensor, forced_indices: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        decoder = self.decoder
        start, count = decoder.layout.image_start, image_embeds.shape[1]
        text = decoder.adapter.embed_text(decoder.model, input_ids)
        hidden = torch.cat([text[:, :start], image_embeds.to(text.dtype), text[:, start + count :]], dim=1)
        hidden, cache, kept = decoder.prefill(hidden, image_embeds, forced_indices)
        outputs = (decoder.logits(hidden), *padded_cache(cache, decoder.layout.decode_steps))
        return (*outputs, kept) if kept is not None else outputs


class DecodeComponent(nn.Module):
    """input_ids (B, 1) + step (1,) + past.* -> logits (B, V), present.*: one greedy step on the static cache."""

    def __init__(self, decoder: ScheduledDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.input_names = (INPUT_IDS, STEP_INPUT, *cache_names("past", decoder.num_layers))
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers))

    def forward(self, input_ids: Tensor, step: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        hidden, present = self.decoder.decode_static(input_ids, step, past)
        return (self.decoder.logits(hidden), *present)
