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
    DEEPSTACK_EMBEDS,
    IMAGE_EMBEDS,
    IMAGE_POSITIONS,
    IMAGE_VALID,
    INPUT_IDS,
    KEPT_INDICES,
    LOGITS,
    PAST_VALID,
    PIXEL_VALUES,
    PRESENT_VALID,
    SEG_HIDDEN,
    STEP_INPUT,
    cache_names,
)
from tpc.methods.schedule import PromptImages
from tpc.passes.decoder import DecoderLayout, ScheduledDecoder, padded_cache
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
    """input_ids (B, L) + image_embeds (B, N_img, D) [+ what the vision graph hands on] -> logits (B, V), present.*
    [, kept_indices].

    The image embeddings replace the image-token positions of each image's run (`place_images`), as transformers'
    `masked_scatter` does for a prompt whose image tokens sit there (the runtime checks that). `from_vision`: the
    vision outputs the prefill also takes, in order: the `guide` its method samples by (`cls_attention`), the image
    tokens' M-RoPE positions (`image_positions`), their DeepStack features (`deepstack_embeds`).
    """

    def __init__(
        self, decoder: ScheduledDecoder, seg: bool = False, guide: str | None = None, from_vision: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.seg, self.guide = seg, guide
        self.from_vision = from_vision
        self.input_names = (INPUT_IDS, IMAGE_EMBEDS, *self.from_vision)
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers))
        if IMAGE_VALID in from_vision:  # the cache's key mask, for decode
            self.output_names += (PRESENT_VALID,)
        if seg:
            self.output_names += (SEG_HIDDEN,)
        if decoder.layout.schedule.prunes:
            self.output_names += (KEPT_INDICES,)

    def forward(
        self, input_ids: Tensor, image_embeds: Tensor, *from_vision: Tensor, forced_indices: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        decoder = self.decoder
        given = dict(zip(self.from_vision, from_vision, strict=True))
        text = decoder.adapter.embed_text(decoder.model, input_ids)
        hidden = place_images(text, image_embeds.to(text.dtype), decoder.layout.prompt)
        positions = given.get(IMAGE_POSITIONS)
        position_ids = None if positions is None else mrope_position_ids(positions, decoder.layout)
        guide = given.get(self.guide) if self.guide else None
        deepstack, valid = given.get(DEEPSTACK_EMBEDS), given.get(IMAGE_VALID)
        key_valid = None if valid is None else key_mask(valid, decoder.layout.prompt)
        hidden, cache, kept = decoder.prefill(
            hidden, image_embeds, forced_indices, guide, position_ids, deepstack, key_valid
        )
        outputs = (decoder.logits(hidden), *padded_cache(cache, decoder.layout.decode_steps))
        if key_valid is not None:  # decode slots are real tokens
            outputs += (torch.cat([key_valid, key_valid.new_ones((len(key_valid), decoder.layout.decode_steps))], 1),)
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


def key_mask(image_valid: Tensor, prompt: PromptImages) -> Tensor:
    """(B, L) int64 1/0: which prompt positions may be attended to: every text token, the image slots `image_valid`
    (B, N, every image's, in prompt order) marks."""
    text = image_valid.new_ones((image_valid.shape[0], prompt.length, 1))
    return place_images(text, image_valid[..., None], prompt)[..., 0]


def mrope_position_ids(image_positions: Tensor, layout: DecoderLayout) -> Tensor:
    """(B, L, 3) M-RoPE positions of the prompt the prefill receives, as transformers' `get_rope_index` numbers the
    unpruned prompt: text tokens count up on all three axes, an image's tokens sit at its start + their (t, h, w)
    (`image_positions`, B, K, 3: the kept ones' original places), and the text after an image resumes
    `image_position_span` past its start, however many of its tokens were kept."""
    assert layout.image_position_span is not None, "an M-RoPE layout"
    prompt, span = layout.prompt, layout.image_position_span
    batch = image_positions.shape[0]
    pieces, position, first, shift = [], 0, 0, 0  # shift: rotary position minus prompt index of the text
    for start, count in zip(prompt.starts, prompt.tokens, strict=True):
        text = torch.arange(position, start, device=image_positions.device) + shift
        pieces += [text.view(1, -1, 1).expand(batch, -1, 3), image_positions[:, first : first + count] + start + shift]
        shift += span - count
        position, first = start + count, first + count
    text = torch.arange(position, prompt.length, device=image_positions.device) + shift
    return torch.cat([*pieces, text.view(1, -1, 1).expand(batch, -1, 3)], dim=1)


class DecodeComponent(nn.Module):
    """input_ids (B, 1) + step (1,) + past.* -> logits (B, V), present.*: one greedy step on the static cache."""

    def __init__(self, decoder: ScheduledDecoder, seg: bool = False, key_valid: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.seg, self.key_valid = seg, key_valid
        valid = ((PAST_VALID,), (PRESENT_VALID,)) if key_valid else ((), ())
        self.input_names = (INPUT_IDS, STEP_INPUT, *cache_names("past", decoder.num_layers), *valid[0])
        self.output_names = (LOGITS, *cache_names("present", decoder.num_layers), *valid[1])
        self.output_names += (SEG_HIDDEN,) if seg else ()

    def forward(self, input_ids: Tensor, step: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """`past`: the cache, then (with `key_valid`) its key mask, handed on unchanged."""
        cache, valid = (past[:-1], past[-1]) if self.key_valid else (past, None)
        hidden, present = self.decoder.decode_static(input_ids, step, cache, valid)
        outputs = (self.decoder.logits(hidden), *present, *(() if valid is None else (valid,)))
        return (*outputs, self.decoder.final_hidden(hidden).float()) if self.seg else outputs
