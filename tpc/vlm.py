"""Planning and building a LLaVA-style VLM export: vision, prefill and decode components, one static layout.

Where the method prunes decides the layout. A vision-side method (HiPrune, DivPrune, random, uniform) hands
K image embeddings to the decoder, so the prefill sees text + K image positions with contiguous positions, as
in the references. A prefill method (FastV) sees all image tokens and keeps K from its layer on, with original
positions. `--method none` is the unpruned model, equal to transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpc.errors import UsageError
from tpc.methods import PrefillMethod, VisionMethod, get_method
from tpc.methods import none as no_pruning
from tpc.models_zoo import LlavaAdapter, ModelSource
from tpc.passes.prune_vision import PrunedVisionEncoder, VisionCut
from tpc.passes.vlm_components import CacheLayout, DecodeComponent, PrefillComponent, VisionComponent
from tpc.pipeline import (
    DTYPES,
    Component,
    DecoderPlan,
    Pruned,
    PruneRequest,
    check_budget,
    check_method_layers,
    check_positions,
    methods_for,
    resolve_keep,
    seeded_pixels,
    split_params,
)
from tpc.runtimes.generation import prefill_ids

DEFAULT_MAX_NEW_TOKENS = 32
MIN_NEW_TOKENS = 8


@dataclass(frozen=True)
class VlmPlan(DecoderPlan):
    """A validated VLM request: method, budget, the static prompt and cache layout."""

    max_new_tokens: int

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.method_params)

    @property
    def prunes_in_prefill(self) -> bool:
        return isinstance(self.method, PrefillMethod)

    @property
    def cut(self) -> VisionCut:
        config = self.source.config
        method, keep = (
            (no_pruning.METHOD, self.prompt.image_tokens) if self.prunes_in_prefill else (self.method, self.keep)
        )
        return VisionCut(
            self.adapter.tower(config),
            self.source.geometry,
            method,
            keep,
            {} if self.prunes_in_prefill else self.method_params,
            self.adapter.feature_layers(config),
            self.adapter.keeps_prefix(config),
        )

    @property
    def cache(self) -> CacheLayout:
        text, full = self.prompt.text_len, self.prompt.length
        layers = self.decoder.num_layers
        if self.prunes_in_prefill:
            prune_layer = self.method.prune_layer(self.method_params)
            lengths = tuple(full if i < prune_layer else text + self.keep for i in range(layers))
            image_tokens, prefill_tokens = self.prompt.image_tokens, full
        else:
            lengths = (text + self.keep,) * layers
            image_tokens, prefill_tokens = self.keep, text + self.keep
        return CacheLayout(
            image_start=self.prompt.image_start,
            image_tokens=image_tokens,
            prefill_tokens=prefill_tokens,
            kept_lengths=lengths,
            decode_steps=self.max_new_tokens - 1,
            next_position=prefill_tokens,  # FastV keeps original positions: the prefill saw the full prompt
        )

    def flops(self) -> dict[str, int]:
        """2x multiply-adds of each stage for one image and prompt (what an ideal runtime's time is proportional to).

        tower: the layers the vision graph runs; projector: on the tokens it receives; prefill: every layer at its
        own length (causal: on average half the prompt as context); decode: the first generated token.
        """
        geometry, decoder, cache = self.source.geometry, self.decoder, self.cache
        projector_in = geometry.hidden_size * len(self.adapter.feature_layers(self.source.config))
        projector = 2 * cache.image_tokens * (projector_in * decoder.hidden_size + decoder.hidden_size**2)
        # each layer's prefill length is the length of its cache after the prefill
        prefill = decoder.head_flops(1) + sum(decoder.layer_flops(n, (n + 1) // 2) for n in cache.kept_lengths)
        decode = decoder.head_flops(1) + sum(decoder.layer_flops(1, n + 1) for n in cache.kept_lengths)
        tower = self.cut.depth * geometry.layer_flops(geometry.sequence_length)
        return {"tower": tower, "projector": projector, "prefill": prefill, "decode_token": decode}

    def generation(self) -> dict[str, Any]:
        """What a runtime needs to drive the components (written to tpc.json as `generation`)."""
        config = self.source.config
        cache = self.cache
        return {
            "image_token_id": self.adapter.image_token_id(config),
            "eos_token_ids": self.adapter.eos_token_ids(config),
            "prompt": {
                "text_tokens": self.prompt.text_len,
                "image_start": self.prompt.image_start,
                "image_tokens": self.prompt.image_tokens,
                "length": self.prompt.length,
            },
            "prefill": {"length": cache.prefill_tokens, "image_tokens": cache.image_tokens},
            "max_new_tokens": self.max_new_tokens,
            "decoder_layers": self.decoder.num_layers,
            "cache": {
                "lengths_after_prefill": list(cache.kept_lengths),
                "capacity": list(cache.capacities),
                "next_position": cache.next_position,
            },
            "protocol": (
                "vision(pixel_values) -> image_embeds; prefill(input_ids with image_embeds' count of image tokens "
                "at prompt.image_start, image_embeds) -> logits, present.*; then for step s = 0, 1, ...: "
                "decode(input_ids = argmax(logits), step = [s], past.* = present.*) -> logits, present.*"
            ),
        }


def plan_vlm(request: PruneRequest, source: ModelSource) -> VlmPlan:
    adapter: LlavaAdapter = source.adapter
    config = source.config
    method = get_method(request.method)
    if not adapter.accepts(method):
        stateful = getattr(method, "stateful", False)
        raise UsageError(
            f"method '{method.name}' does not apply to {adapter.family} models"
            + (" (it carries action attention between control steps: policies only)" if stateful else "")
            + f"; methods for {adapter.family}: {', '.join(methods_for(adapter))}"
        )
    method_params, feature_layer = split_params(request.params)
    if feature_layer is not None:
        raise UsageError(
            "--param feature_layer does not apply to a VLM: its config's vision_feature_layer decides the features"
        )
    geometry, decoder = source.geometry, adapter.decoder(config)
    feature_layers = adapter.feature_layers(config)
    derived = (  # the raw vision_feature_layer too: HiPrune pairs hidden_states[p] with attentions[p] (layer p+1)
        method.model_defaults(geometry.num_layers, max(feature_layers), config.vision_feature_layer)
        if isinstance(method, VisionMethod)
        else {}
    )
    params = method.resolve_params(method_params, derived)
    check_method_layers(method, params, {"encoder": (1, geometry.num_layers), "decoder": (1, decoder.num_layers - 1)})
    num_image = adapter.image_tokens(config)
    prefix = geometry.prefix_tokens if adapter.keeps_prefix(config) and isinstance(method, VisionMethod) else 0
    what = "one image is {n} image tokens in the prompt" + (f" ({prefix} CLS always kept)" if prefix else "")
    keep = resolve_keep(request.keep, method, num_image, prefix + 1, what)
    check_budget(method, keep - prefix, params)
    max_new = request.max_new_tokens if request.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new < MIN_NEW_TOKENS:
        raise UsageError(
            f"--max-new-tokens must be at least {MIN_NEW_TOKENS} (verification compares that many generated tokens), "
            f"got {max_new}"
        )
    user_dir = source.user_dir
    layout = adapter.default_layout(config, user_dir, request.prompt_len)
    check_positions(
        layout.length + max_new - 1,
        decoder.max_positions,
        f"the prompt ({layout.text_len} text + {layout.image_tokens} image tokens) and {max_new} new tokens",
        "lower --prompt-len or --max-new-tokens",
    )
    return VlmPlan(request, source, method, keep, params, layout, max_new)


def build_vlm(plan: VlmPlan) -> Pruned:
    """Load through `from_pretrained`, then the three components sharing one set of weights."""
    source, adapter, request = plan.source, plan.adapter, plan.request
    model = adapter.load(source.path).to(DTYPES[request.dtype])
    projector = adapter.projector(model)
    tower = PrunedVisionEncoder(adapter.vision_tower(model), plan.cut, signal_embedding=projector)
    vision = VisionComponent(tower, projector).eval()
    prefill_method = plan.method if plan.prunes_in_prefill else None
    prefill = PrefillComponent(model, adapter, plan.cache, prefill_method, plan.keep, plan.method_params).eval()
    decode = DecodeComponent(model, adapter, plan.cache).eval()
    components = {
        "vision": Component("vision", vision, vision.input_names, vision.output_names),
        "prefill": Component("prefill", prefill, prefill.input_names, prefill.output_names),
        "decode": Component("decode", decode, decode.input_names, decode.output_names),
    }

    def samples(seed: int) -> dict[str, dict[str, Tensor]]:
        return component_samples(plan, components, seed)

    return Pruned(request, plan, components, samples)


def seeded_prompt(plan: VlmPlan, seed: int) -> np.ndarray:
    """(B, prompt length) int64, as a processor makes it: one image's run of image tokens inside text tokens.

    Seed 0 of a model with a chat template is the template's prompt; otherwise the text tokens are seeded.
    """
    image_id = plan.adapter.image_token_id(plan.source.config)
    start, count = plan.prompt.image_start, plan.prompt.image_tokens
    if seed == 0 and plan.prompt.template is not None:
        text = np.array([t for t in plan.prompt.template if t != image_id], dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        text = rng.integers(3, plan.decoder.vocab_size, size=plan.prompt.text_len, dtype=np.int64)
        text[text == image_id] = 3
        text[0] = 1  # BOS
    row = np.concatenate([text[:start], np.full(count, image_id, dtype=np.int64), text[start:]])
    return np.tile(row, (plan.request.batch, 1))


def component_samples(plan: VlmPlan, components: dict[str, Component], seed: int) -> dict[str, dict[str, Tensor]]:
    """Seeded inputs for each component (a seeded image and prompt, chained through the eager components)."""
    pixels = seeded_pixels(plan.source, plan.request, seed)
    ids = prefill_ids(plan.generation(), seeded_prompt(plan, seed))
    return chained_samples(plan, components, pixels, ids)


def chained_samples(
    plan: VlmPlan, components: dict[str, Component], pixels: Tensor, ids: np.ndarray
) -> dict[str, dict[str, Tensor]]:
    """Each component's inputs for one image and prompt: vision -> prefill -> the first decode step."""
    ids_tensor = torch.from_numpy(ids)
    with torch.no_grad():
        image_embeds = components["vision"].module(pixels)[0]
        prefill_out = components["prefill"].module(ids_tensor, image_embeds)
    token = prefill_out[0].argmax(dim=-1, keepdim=True)
    present = prefill_out[1 : 1 + 2 * plan.decoder.num_layers]
    past = dict(zip(components["decode"].input_names[2:], present, strict=True))
    return {
        "vision": {"pixel_values": pixels},
        "prefill": {"input_ids": ids_tensor, "image_embeds": image_embeds},
        "decode": {"input_ids": token, "step": torch.zeros(1, dtype=torch.int64), **past},
    }


plan = plan_vlm  # the kind's entry points, as tpc.pipeline.DECODER_KINDS calls them
build = build_vlm
