"""Model pass: a LLaVA-style VLM as the three graphs it is deployed as — vision, prefill, decode.

The prefill and decode graphs are two entry points of one `tpc.passes.decoder.ScheduledDecoder`, which runs the
method's token schedule: a vision-side method hands K image embeddings to the decoder (a schedule without
transitions); FastV, CATP and LVLM_CSP prune inside the prefill. Every shape is fixed by the configuration; only
`step`'s value changes between decode calls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tpc.contract.names import (
    CLS_ATTENTION,
    IMAGE_EMBEDS,
    INPUT_IDS,
    KEPT_INDICES,
    LOGITS,
    PIXEL_VALUES,
    SEG_HIDDEN,
    STEP_INPUT,
    cache_names,
)
from tpc.methods.schedule import PromptImages
from tpc.passes.decoder import ScheduledDecoder, padded_cache
from tpc.passes.prune_vision import PrunedVisionEncoder


class VisionComponent(nn.Module):
    """pixel_values -> image_embeds (B, K, D_text): the pruned tower, then the projector on the kept tokens only
    (and, when the tower's cut outputs it, the CLS row's attention to each image token: `cls_attention`)."""

    input_names = (PIXEL_VALUES,)

    def __init__(self, tower: PrunedVisionEncoder, projector: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector
        cls = (CLS_ATTENTION,) if tower.cut.cls_layer is not None else ()
        self.output_names = (IMAGE_EMBEDS, KEPT_INDICES, *cls)

    def forward(self, pixel_values: Tensor, forced_indices: Tensor | None = None) -> tuple[Tensor, ...]:
        kept_features, kept_indices = self.tower(pixel_values, forced_indices)
        outputs = (self.projector(kept_features), kept_indices)
        return (*outputs, self.tower.cls_attention()) if self.tower.cut.cls_layer is not None else outputs


class PrefillComponent(nn.Module):
    """input_ids (B, L) + image_embeds (B, N_img, D) -> logits (B, V), present.* [, kept_indices].

    The image embeddings replace the image-token positions of each image's run (`place_images`), as transformers'
    `masked_scatter` does for a prompt whose image tokens sit there (the runtime checks that).
    """

    def __init__(self, decoder: ScheduledDecoder, seg: bool = False, guide: str | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.seg, self.guide = seg, guide
        self.input_names = (INPUT_IDS, IMAGE_EMBEDS, *((guide,) if guide else ()))
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers))
        if seg:
            self.output_names += (SEG_HIDDEN,)
        if decoder.layout.schedule.prunes:
            self.output_names += (KEPT_INDICES,)

    def forward(
        self,
        input_ids: Tensor,
        image_embeds: Tensor,
        guide: Tensor | None = None,
        forced_indices: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """`guide` (B, N): the vision graph's signal the method samples by, when it reads one (`self.guide`)."""
        decoder = self.decoder
        text = decoder.adapter.embed_text(decoder.model, input_ids)
        hidden = place_images(text, image_embeds.to(text.dtype), decoder.layout.prompt)
        hidden, cache, kept = decoder.prefill(hidden, image_embeds, forced_indices, guide)
        outputs = (decoder.logits(hidden), *padded_cache(cache, decoder.layout.decode_steps))
        if self.seg:
            outputs += (decoder.final_hidden(hidden).float(),)
        return (*outputs, kept) if kept is not None else outputs


def place_images(text: Tensor, image_embeds: Tensor, prompt: PromptImages) -> Tensor:
    """The prompt's embeddings: each image's run of `image_embeds` (B, N, D: every image's, in prompt order) in place
    of the image-token positions, as transformers' `masked_scatter` does."""
    pieces, position, first = [], 0, 0
    for start, count in zip(prompt.starts, prompt.tokens, strict=True):
        pieces += [text[:, position:start], image_embeds[:, first : first + count]]
        position, first = start + count, first + count
    return torch.cat([*pieces, text[:, position:]], dim=1)


class DecodeComponent(nn.Module):
    """input_ids (B, 1) + step (1,) + past.* -> logits (B, V), present.*: one greedy step on the static cache."""

    def __init__(self, decoder: ScheduledDecoder, seg: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.seg = seg
        self.input_names = (INPUT_IDS, STEP_INPUT, *cache_names("past", decoder.num_layers))
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers), *((SEG_HIDDEN,) if seg else ()))

    def forward(self, input_ids: Tensor, step: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        hidden, present = self.decoder.decode_static(input_ids, step, past)
        outputs = (self.decoder.logits(hidden), *present)
        return (*outputs, self.decoder.final_hidden(hidden).float()) if self.seg else outputs
