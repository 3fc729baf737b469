"""Planning and building a LLaVA-style VLM export: vision, prefill and decode components, one static layout.

Where the method prunes decides the layout. A vision-side method (HiPrune, DivPrune, random, uniform) hands
K image embeddings to the decoder, so the prefill sees text + K image positions with contiguous positions, as
in the references. A prefill method (FastV, CATP, LVLM_CSP) sees all image tokens and runs its token schedule,
with original positions. A prompt may hold several images (`--param shots=N`: N examples, then the query): the
vision graph runs once per image. `--method none` is the unpruned model, equal to transformers' `generate`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpc.contract.cost import StageCost, flops_by_component
from tpc.contract.manifest import GENERATION_FILE, SAMPLES_DIR, Manifest, TensorSpec
from tpc.contract.names import (
    CLS_ATTENTION,
    DECODE,
    DEEPSTACK_EMBEDS,
    IMAGE_POSITIONS,
    IMAGE_VALID,
    INPUT_IDS,
    PIXEL_VALUES,
    PREFILL,
    PROJECTOR,
    SELECT,
    STEP_INPUT,
    TAPS,
    TOWER,
    VISION,
)
from tpc.contract.protocols import CacheSpec, GenerationProtocol, PrefillSpec, PromptSpec
from tpc.contract.report import Diff, GenerationCheck, ShippedCheck, Tolerance, VerifyReport
from tpc.errors import UsageError
from tpc.kinds.base import (
    DTYPES,
    Component,
    CostScale,
    DecoderPlan,
    Kind,
    Pruned,
    PruneRequest,
    Sessions,
    as_arrays,
    check_accepts,
    check_budget,
    check_method_layers,
    check_positions,
    decode_costs,
    eager_outputs,
    prefill_costs,
    resolve_keep,
    seeded_pixels,
    split_params,
    tower_costs,
)
from tpc.kinds.checks import array_problems, first_difference
from tpc.kinds.tower import render_tower, tower_description
from tpc.methods import Method, Param, PrefillMethod, VisionMethod, get_method
from tpc.methods import none as no_pruning
from tpc.methods.schedule import ALL_ROWS, LAST_ROW, SPAN_ROWS, PromptImages, Prune, TokenSchedule
from tpc.models_zoo import LlavaAdapter, ModelSource, QwenVlAdapter
from tpc.passes.decoder import DecoderLayout, ScheduledDecoder
from tpc.passes.prune_vision import PrunedVisionEncoder, VisionCut
from tpc.passes.qwen_components import GLOBAL, SCORINGS, QwenCut, QwenVisionComponent
from tpc.passes.vlm_components import DecodeComponent, PrefillComponent, VisionComponent
from tpc.progress import Step
from tpc.runtimes.generation import GenerationLoop, prefill_ids

DEFAULT_MAX_NEW_TOKENS = 32
MIN_NEW_TOKENS = 8


@dataclass(frozen=True)
class VlmPlan(DecoderPlan):
    """A validated VLM request: method, budget, the static prompt and cache layout."""

    max_new_tokens: int
    family_params: dict[str, Any] = field(default_factory=dict)  # a Qwen export's image_size, scoring, retain

    @property
    def adapter(self) -> VlmAdapter:
        return vlm_adapter(self.source)

    @property
    def qwen(self) -> QwenVlAdapter | None:
        """The adapter when the model is a Qwen-VL (merged tokens, M-RoPE, DeepStack), else None."""
        return self.adapter if isinstance(self.adapter, QwenVlAdapter) else None

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, the prompt's `shots` when it has examples, a Qwen export's family parameters
        (tpc.json records them all)."""
        shots = {"shots": self.prompt.images - 1} if self.prompt.images > 1 else {}
        return {**self.method_params, **shots, **self.family_params}

    @property
    def prunes_in_prefill(self) -> bool:
        return isinstance(self.method, PrefillMethod)

    @property
    def guide(self) -> str | None:
        """The vision output the prefill's method samples by (LVLM_CSP's CLS attention), if it reads one."""
        return self.method.vision_guide(self.method_params) if self.prunes_in_prefill else None

    @property
    def per_image(self) -> int:
        """Image tokens each image hands to the decoder: K for a vision-side method, all of them otherwise."""
        return self.prompt.image_tokens if self.prunes_in_prefill else self.keep

    @property
    def cut(self) -> VisionCut | QwenCut:
        config = self.source.config
        method = no_pruning.METHOD if self.prunes_in_prefill else self.method
        params = {} if self.prunes_in_prefill else self.method_params
        if self.qwen is not None:
            scoring = self.family_params.get("scoring", GLOBAL)
            deepstack = self.qwen.deepstack_levels(config) > 0
            grid, depth = self.qwen.grid(config), self.source.geometry.num_layers
            exact = self.exact_count
            return QwenCut(method, self.per_image, params, grid, depth, scoring, deepstack, exact)
        adapter = llava_adapter(self.source)
        return VisionCut(
            adapter.tower(config),
            self.source.geometry,
            method,
            self.per_image,
            params,
            adapter.feature_layers(config),
            adapter.keeps_prefix(config),
            max(adapter.feature_layers(config)) if self.guide == CLS_ATTENTION else None,
        )

    @property
    def prompt_images(self) -> PromptImages:
        """Where the image runs sit in the prompt the prefill receives."""
        prompt, per_image = self.prompt, self.per_image
        length = prompt.text_len + prompt.images * per_image
        return PromptImages(prompt.starts_with(per_image), (per_image,) * prompt.images, length)

    @property
    def schedule(self) -> TokenSchedule:
        """Which image tokens each decoder layer sees: K per image from the start for a vision-side method."""
        if self.prunes_in_prefill:
            return self.method.schedule(self.method_params, self.keep, self.prompt_images)
        images = self.prompt_images.tokens
        return TokenSchedule(sum(images), (), images if len(images) > 1 else ())

    def cache_bytes(self, new_tokens: int | None = None) -> int:
        return super().cache_bytes(self.max_new_tokens if new_tokens is None else new_tokens)

    @property
    def kept_widths(self) -> tuple[int, ...]:
        return self.schedule.kept_widths

    @property
    def cache(self) -> DecoderLayout:
        return DecoderLayout(
            image_starts=self.prompt_images.starts,
            text_tokens=self.prompt.text_len,
            schedule=self.schedule,
            num_layers=self.decoder.num_layers,
            decode_steps=self.max_new_tokens - 1,
            image_position_span=self.qwen.grid(self.source.config).position_span if self.qwen else None,
        )

    @property
    def exact_count(self) -> bool:
        """HiPrune-Qwen with `qwen_duplicates=reference`: the K slots carry a validity mask, used as a key mask."""
        return self.family_params.get("qwen_duplicates") == REFERENCE_COUNT

    @property
    def from_vision(self) -> tuple[str, ...]:
        """The vision outputs the prefill takes besides the embeddings: the guide its method samples by; a Qwen's
        M-RoPE positions and DeepStack features of the tokens handed on."""
        guide = (self.guide,) if self.guide else ()
        if self.qwen is None:
            return guide
        deepstack = (DEEPSTACK_EMBEDS,) if self.qwen.deepstack_levels(self.source.config) else ()
        valid = (IMAGE_VALID,) if self.exact_count else ()
        return (*guide, IMAGE_POSITIONS, *deepstack, *valid)

    def flops(self) -> dict[str, int]:
        """2x multiply-adds of each stage for one image and prompt (what an ideal runtime's time is proportional to),
        summed from the stage costs (`stage_costs`): tower (its taps and select included) and projector of every
        image; prefill (its LM head included); decode: the first generated token."""
        costs = self.stage_costs(CostScale())
        images = self.prompt.images
        projector = images * sum(c.flops for c in costs if c.component == VISION and c.stage == PROJECTOR)
        per_component = flops_by_component(costs)
        return {
            "tower": images * per_component[VISION] - projector,
            "projector": projector,
            "prefill": per_component[PREFILL],
            "decode_token": per_component[DECODE],
        }

    def stage_costs(self, scale: CostScale) -> list[StageCost]:
        """One call of each component: the vision graph (one image), the prefill, one decode step."""
        cache, decoder = self.cache, self.decoder
        return [
            *self.vision_costs(scale),
            *prefill_costs(PREFILL, cache, decoder, scale),
            *decode_costs(DECODE, cache, decoder, 1, scale, static=True),
        ]

    def vision_costs(self, scale: CostScale) -> list[StageCost]:
        """One image through the vision graph: a LLaVA tower cut at its feature layer, its taps, the select and the
        projector on the tokens handed on; or a Qwen tower, its taps, the merger on every merged token, the select."""
        kept = self.per_image if self.method.prunes and not self.prunes_in_prefill else None
        config, decoder = self.source.config, self.decoder
        if self.qwen is not None:
            vision, patches, tokens = config.vision_config, self.source.geometry.num_patches, self.per_image
            d, out, wide = vision.hidden_size, vision.out_hidden_size, vision.hidden_size * vision.spatial_merge_size**2
            merged_tokens = self.qwen.grid(config).tokens
            tower_weights = vision.depth * (4 * d * d + (3 if self.qwen.windowed else 2) * d * vision.intermediate_size)
            tower, merger = self.qwen.tower_flops(config), self.qwen.merger_flops(config)
            mergers = 1 + self.qwen.deepstack_levels(config)
            costs = [scale.cost(VISION, TOWER, tower, tower_weights, 2 * patches * d, tower)]
            if self.cut.tapped_layers:
                costs.append(scale.cost(VISION, TAPS, 0, 0, len(self.cut.tapped_layers) * 2 * patches * d))
            merger_weights = mergers * (wide * wide + wide * out)
            costs.append(scale.cost(VISION, PROJECTOR, merger, merger_weights, merged_tokens * (wide + out), merger))
            if kept is not None:
                costs.append(scale.cost(VISION, SELECT, 0, 0, 2 * tokens * mergers * out))
            return costs
        geometry, cut = self.source.geometry, self.cut
        assert isinstance(cut, VisionCut)
        taps = len(cut.tapped_layers) + (cut.cls_layer is not None)
        projector_in = geometry.hidden_size * len(llava_adapter(self.source).feature_layers(config))
        dd, tokens = decoder.hidden_size, self.per_image
        projector_weights = projector_in * dd + dd * dd
        return [
            *tower_costs(VISION, geometry, cut.depth, taps, kept, scale),
            scale.cost(
                VISION, PROJECTOR, 2 * tokens * projector_weights, projector_weights, tokens * (projector_in + dd)
            ),
        ]

    def generation(self) -> GenerationProtocol:
        """What a runtime needs to drive the components (written to tpc.json as `generation`)."""
        config = self.source.config
        cache = self.cache
        return GenerationProtocol(
            image_token_id=self.adapter.image_token_id(config),
            eos_token_ids=tuple(self.adapter.eos_token_ids(config)),
            prompt=PromptSpec(
                text_tokens=self.prompt.text_len,
                image_start=self.prompt.image_start,
                image_tokens=self.prompt.image_tokens,
                length=self.prompt.length,
                image_starts=self.prompt.image_starts if self.prompt.images > 1 else None,
            ),
            prefill=PrefillSpec(length=cache.prefill_tokens, image_tokens=cache.image_tokens),
            max_new_tokens=self.max_new_tokens,
            decoder_layers=self.decoder.num_layers,
            cache=CacheSpec(
                lengths_after_prefill=tuple(cache.kept_lengths),
                capacity=tuple(cache.capacities),
                next_position=cache.next_position,
            ),
            seg_token_id=self.adapter.seg_token_id(config),
            vision_to_prefill=self.from_vision or None,
            protocol=(
                "vision(pixel_values) -> image_embeds, once per image (prompt.image_starts: several images); "
                "prefill(input_ids with each image's run shortened to its image_embeds, image_embeds of every image "
                "concatenated in prompt order) -> logits, present.*; then for step s = 0, 1, ...: "
                "decode(input_ids = argmax(logits), step = [s], past.* = present.*) -> logits, present.*"
            ),
        )


VlmAdapter = LlavaAdapter | QwenVlAdapter


def vlm_adapter(source: ModelSource) -> VlmAdapter:
    """A VLM's adapter, typed (the families whose kind is a VLM)."""
    adapter = source.adapter
    assert isinstance(adapter, LlavaAdapter | QwenVlAdapter), "a VLM is a LLaVA- or Qwen-VL-family model"
    return adapter


def llava_adapter(source: ModelSource) -> LlavaAdapter:
    """A LLaVA-family VLM's adapter (its tower, feature layers and projector)."""
    adapter = source.adapter
    assert isinstance(adapter, LlavaAdapter), "a LLaVA-family model"
    return adapter


# a Qwen-VL export's own parameters (beside the method's)
IMAGE_SIZE = Param("image_size", int, None, "the image side the export is built for, in pixels", low=1)
SCORING = Param(
    "scoring",
    str,
    GLOBAL,
    "tower attention scored over all patches (the reference's flash-attention-2 branch) or within each windowed "
    "block's windows (its eager branch)",
    choices=SCORINGS,
)
RETAIN = Param(
    "retain",
    float,
    None,
    "the share of the image tokens kept (keep = round(tokens * retain))",
    low=0.0,
    high=1.0,
    low_open=True,
)
STATIC_FILL, REFERENCE_COUNT = "fill", "reference"
QWEN_DUPLICATES = Param(
    "qwen_duplicates",
    str,
    STATIC_FILL,
    "HiPrune: fill the slots of re-picked anchors/buffers with the next-best deep tokens (static count), or keep the "
    "reference's count N' - #duplicates (padded slots masked out of attention)",
    choices=(STATIC_FILL, REFERENCE_COUNT),
)
QWEN_PARAMS = {param.name: param for param in (IMAGE_SIZE, SCORING, RETAIN, QWEN_DUPLICATES)}


def qwen_source(source: ModelSource, adapter: QwenVlAdapter, given: dict[str, str]) -> tuple[ModelSource, dict]:
    """Pop a Qwen export's own parameters from `given`: (the source with the image size the export is built for,
    its parameters as tpc.json records them)."""
    values = {name: QWEN_PARAMS[name].parse(given.pop(name)) for name in list(given) if name in QWEN_PARAMS}
    config = copy.deepcopy(source.config)
    size = values.get("image_size", adapter.image_size(config))
    adapter.check_image_size(config, size)
    config.vision_config.image_size = size
    values["image_size"] = size
    return replace(source, config=config), values


def qwen_keep(keep: int | None, retain: float | None, tokens: int) -> int | None:
    """`--keep`, or `--param retain` as the reference's ratio (N' = round(tokens * retain), Python rounding)."""
    if retain is None:
        return keep
    ratio_keep = round(tokens * retain)
    if keep is not None and keep != ratio_keep:
        raise UsageError(
            f"--keep {keep} and --param retain={retain} disagree (round({tokens} x {retain}) = {ratio_keep}); give one"
        )
    return ratio_keep


def plan_vlm(request: PruneRequest, source: ModelSource) -> VlmPlan:
    adapter = vlm_adapter(source)
    method = get_method(request.method)
    stateful = " (it carries action attention between control steps: policies only)"
    check_accepts(adapter, method, "does not apply to {family} models" + (stateful if method.stateful else ""))
    method_params, feature_layer = split_params(request.params)
    if feature_layer is not None:
        raise UsageError(
            "--param feature_layer does not apply to a VLM: its config's vision_feature_layer decides the features"
        )
    if method.name in adapter.refused_methods:
        why = adapter.refused_methods[method.name]
        raise UsageError(f"method '{method.name}' does not apply to {adapter.family} models yet: {why}")
    family_params: dict[str, Any] = {}
    if isinstance(adapter, QwenVlAdapter):
        source, family_params = qwen_source(source, adapter, method_params)
    config = source.config
    geometry, decoder = source.geometry, adapter.decoder(config)
    derived = (
        adapter.vision_defaults(method, config)
        if isinstance(method, VisionMethod)
        else method.model_defaults(decoder.num_layers)
    )
    shots = resolve_shots(method_params.pop("shots", None), method)
    params = method.resolve_params(method_params, derived)
    reads_tower = isinstance(method, VisionMethod) and bool(method.tapped_layers(params))
    if family_params.get("scoring", GLOBAL) != GLOBAL and not reads_tower:
        raise UsageError(f"--param scoring applies to methods that read the tower's attention, not {method.name}")
    if family_params.get("qwen_duplicates", STATIC_FILL) != STATIC_FILL and method.name != "hiprune":
        raise UsageError(f"--param qwen_duplicates applies to hiprune (its duplicates quirk), not {method.name}")
    check_method_layers(method, params, {"encoder": (1, geometry.num_layers), "decoder": (1, decoder.num_layers - 1)})
    num_image = adapter.image_tokens(config)
    keeps_prefix = isinstance(adapter, LlavaAdapter) and adapter.keeps_prefix(config)
    prefix = geometry.prefix_tokens if keeps_prefix and isinstance(method, VisionMethod) else 0
    if isinstance(method, PrefillMethod) and shots:  # one budget over every image of the prompt
        what = f"the prompt's {shots + 1} images are {{n}} image tokens"
        keep = resolve_keep(request.keep, method, num_image * (shots + 1), 1, what)
    else:  # a vision-side method keeps K of each image
        what = "one image is {n} image tokens in the prompt" + (f" ({prefix} CLS always kept)" if prefix else "")
        retain = family_params.get("retain")
        given_keep = request.keep if retain is None else qwen_keep(request.keep, retain, num_image)
        keep = resolve_keep(given_keep, method, num_image, prefix + 1, what)
    check_budget(method, keep - prefix, params)
    max_new = request.max_new_tokens if request.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new < MIN_NEW_TOKENS:
        raise UsageError(
            f"--max-new-tokens must be at least {MIN_NEW_TOKENS} (verification compares that many generated tokens), "
            f"got {max_new}"
        )
    layout = adapter.default_layout(config, source.files_dir, request.prompt_len, shots)
    check_positions(
        layout.length + max_new - 1,
        decoder.max_positions,
        f"the prompt ({layout.text_len} text + {layout.images} x {layout.image_tokens} image tokens) and {max_new} "
        "new tokens",
        "lower --prompt-len, --max-new-tokens or --param shots",
    )
    plan = VlmPlan(request, source, method, keep, params, layout, max_new, family_params)
    if plan.guide == CLS_ATTENTION and geometry.prefix_tokens == 0:
        raise UsageError(
            f"--method {method.name}: the {llava_adapter(source).tower(config).family} tower has no CLS token to "
            "sample by; use another sampler (--param sampler=uniform)"
        )
    try:  # the schedule's own rules: budgets per stage, layer order, layers inside the decoder
        plan.schedule.ranges(decoder.num_layers)
    except ValueError as error:
        raise UsageError(f"--method {method.name} --keep {keep}: {error}") from None
    return plan


SHOTS = Param("shots", int, 0, "in-context example images before the query image (an n-shot prompt)", low=0)


def resolve_shots(given: str | None, method: Method) -> int:
    """The prompt's example images: the user's `--param shots`, or the method's default; at least its fewest."""
    fewest, default = method.shots
    shots = default if given is None else SHOTS.parse(given)
    if shots < fewest:
        raise UsageError(
            f"--param shots={shots}: method {method.name} needs an in-context prompt of at least {fewest} example "
            f"image(s) before the query image (use --param shots={max(fewest, default)})"
        )
    return int(shots)


def build_vlm(plan: VlmPlan) -> Pruned:
    """Load through `from_pretrained`, then the three components sharing one set of weights."""
    source, adapter, request = plan.source, plan.adapter, plan.request
    # transformers wraps PreTrainedModel.to (functools.wraps of nn.Module.to): mypy does not bind its self
    model = adapter.load(source.path).to(DTYPES[request.dtype])  # type: ignore[arg-type]
    vision = vision_component(plan, model).eval()
    prefill_method = plan.method if plan.prunes_in_prefill else None
    decoder = ScheduledDecoder(model, adapter, plan.cache, prefill_method, plan.method_params)
    seg = plan.adapter.seg_token_id(source.config) is not None
    prefill = PrefillComponent(decoder, seg, plan.guide, plan.from_vision).eval()
    decode = DecodeComponent(decoder, seg, key_valid=plan.exact_count).eval()
    components = {
        "vision": Component("vision", vision, vision.input_names, vision.output_names),
        "prefill": Component("prefill", prefill, prefill.input_names, prefill.output_names),
        "decode": Component("decode", decode, decode.input_names, decode.output_names),
    }

    def samples(seed: int) -> dict[str, dict[str, Tensor]]:
        return component_samples(plan, components, seed)

    return Pruned(request, plan, components, samples)


def vision_component(plan: VlmPlan, model: Any) -> VisionComponent | QwenVisionComponent:
    """The vision graph of the plan's family: a LLaVA tower cut at its feature layer + the projector on the kept
    tokens, or a Qwen tower + merger selecting among the merged tokens."""
    cut = plan.cut
    if isinstance(cut, QwenCut):
        assert plan.qwen is not None
        return QwenVisionComponent(plan.qwen.vision_tower(model), cut)
    adapter = llava_adapter(plan.source)
    projector = adapter.projector(model)
    return VisionComponent(PrunedVisionEncoder(adapter.vision_tower(model), cut, signal_embedding=projector), projector)


def seeded_prompt(plan: VlmPlan, seed: int) -> np.ndarray:
    """(B, prompt length) int64, as a processor makes it: each image's run of image tokens inside text tokens.

    Seed 0 of a model with a chat template is the template's prompt; otherwise the text tokens are seeded (never an
    image or [SEG] token), and a model with a [SEG] token gets it as the prompt's last token: a LISA-style answer
    prefix ("... it is [SEG]"), so that the prefill's last position is the one a mask decoder reads.
    """
    config = plan.source.config
    image_id, seg_id = plan.adapter.image_token_id(config), plan.adapter.seg_token_id(config)
    brackets = plan.adapter.image_brackets(config)
    count = plan.prompt.image_tokens
    templated = seed == 0 and plan.prompt.template is not None
    if templated:
        text = np.array([t for t in plan.prompt.template or () if t != image_id], dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        text = rng.integers(3, plan.decoder.vocab_size, size=plan.prompt.text_len, dtype=np.int64)
        reserved = [image_id, *([] if seg_id is None else [seg_id]), *plan.adapter.reserved_token_ids(config)]
        text[np.isin(text, reserved)] = 3
        text[0] = 1  # BOS
        if seg_id is not None:
            text[-1] = seg_id
    pieces, used = [], 0
    for i, start in enumerate(plan.prompt.image_starts):
        text_start = start - i * count  # where the image sits among the text tokens
        if brackets is not None and not templated:  # <|vision_start|> image <|vision_end|> (text on both sides)
            text[text_start - 1], text[text_start] = brackets
        pieces += [text[used:text_start], np.full(count, image_id, dtype=np.int64)]
        used = text_start
    row = np.concatenate([*pieces, text[used:]])
    return np.tile(row, (plan.request.batch, 1))


def seeded_images(plan: VlmPlan, seed: int) -> Tensor:
    """(B, C, H, W) seeded pixels; a prompt of several images: (B, images, C, H, W), the first image seed's own."""
    request, images = plan.request, plan.prompt.images
    if images == 1:
        return seeded_pixels(plan.source, request, seed)
    return torch.stack([seeded_pixels(plan.source, request, seed * 101 + i) for i in range(images)], dim=1)


def component_samples(plan: VlmPlan, components: dict[str, Component], seed: int) -> dict[str, dict[str, Tensor]]:
    """Seeded inputs for each component (seeded images and prompt, chained through the eager components)."""
    ids = prefill_ids(plan.generation(), seeded_prompt(plan, seed))
    return chained_samples(plan, components, seeded_images(plan, seed), ids)


def chained_samples(
    plan: VlmPlan, components: dict[str, Component], pixels: Tensor, ids: np.ndarray
) -> dict[str, dict[str, Tensor]]:
    """Each component's inputs for one prompt: vision (its first image) -> prefill (every image's outputs,
    concatenated in prompt order, as the generation loop hands them on) -> the first decode step."""
    prefill = components["prefill"]
    given = {INPUT_IDS: ids, **GenerationLoop(eager_runs(components), plan.generation()).encode_images(pixels.numpy())}
    prefill_inputs = {name: torch.from_numpy(given[name]) for name in prefill.input_names}
    with torch.no_grad():
        prefill_out = prefill.module(*prefill_inputs.values())
    token = prefill_out[0].argmax(dim=-1, keepdim=True)
    outputs = dict(zip(prefill.output_names, prefill_out, strict=True))
    past = {name: outputs[name.replace("past.", "present.", 1)] for name in components["decode"].input_names[2:]}
    return {
        "vision": {PIXEL_VALUES: pixels[:, 0] if plan.prompt.images > 1 else pixels},
        "prefill": prefill_inputs,
        "decode": {INPUT_IDS: token, STEP_INPUT: torch.zeros(1, dtype=torch.int64), **past},
    }


def eager_runs(components: dict[str, Component]) -> dict[str, Callable[[dict[str, np.ndarray]], dict]]:
    """The eager components as the generation loop calls components: numpy inputs by name -> outputs by name."""
    return {name: functools.partial(eager_outputs, component) for name, component in components.items()}


def eager_loop(pruned: Pruned) -> GenerationLoop:
    """The generation loop over the eager components: what an exported VLM must reproduce."""
    return GenerationLoop(eager_runs(pruned.components), pruned.plan.generation())


def generation_inputs(pruned: Pruned, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return seeded_images(pruned.plan, seed).numpy(), seeded_prompt(pruned.plan, seed)


def check_generation(
    pruned: Pruned, exported: GenerationLoop, seeds: list[int], tolerance: Tolerance
) -> GenerationCheck:
    """Greedy tokens exported vs eager on seeded prompts; for a segmentation model also the final hidden state at
    every [SEG] token fed (rows whose tokens agree), what a mask decoder would receive."""
    eager = eager_loop(pruned)
    seg_id = pruned.plan.generation().seg_token_id
    check = GenerationCheck(len(seeds), pruned.plan.max_new_tokens, 0, 0)
    for sample, seed in enumerate(seeds):
        pixels, ids = generation_inputs(pruned, seed)
        want, want_hidden = eager.generate_with_hidden(pixels, ids, stop_at_eos=False)
        got, got_hidden = exported.generate_with_hidden(pixels, ids, stop_at_eos=False)
        equal = np.all(got == want, axis=1)
        check.rows += equal.size
        check.rows_equal += int(equal.sum())
        if check.first_difference is None and not equal.all():
            row = int(np.argmin(equal))
            check.first_difference = [sample, row, int(np.argmax(got[row] != want[row]))]
        if seg_id is not None and want_hidden is not None:
            fed = np.concatenate([ids[:, -1:], want[:, :-1]], axis=1)  # the token each hidden state belongs to
            at = (fed == seg_id) & equal[:, None]
            got_seg = got_hidden[at] if got_hidden is not None else np.zeros(0)
            check.seg_hidden = Diff.of(got_seg, want_hidden[at], tolerance).worst(check.seg_hidden)
            check.seg_tokens += int(at.sum())
    return check


GENERATION_SAMPLE = f"{SAMPLES_DIR}/{GENERATION_FILE}"


def vlm_generation(manifest: Manifest) -> GenerationProtocol:
    """The generation section of a VLM export's manifest (the kind of an export is the section it has)."""
    assert manifest.generation is not None, "a VLM export's manifest has its generation section"
    return manifest.generation


def prompt_pixels(manifest: Manifest) -> TensorSpec:
    """The pixels a whole prompt takes: the vision graph's `pixel_values`, with an images axis for several."""
    pixels = next(s for s in manifest.component(VISION).inputs if s.name == PIXEL_VALUES)
    images = len(vlm_generation(manifest).prompt.starts)
    if images == 1:
        return pixels
    return TensorSpec(PIXEL_VALUES, [pixels.shape[0], images, *pixels.shape[1:]], pixels.dtype)


def check_generation_sample(pruned: Pruned, manifest: Manifest, sample: dict[str, np.ndarray]) -> ShippedCheck:
    name = f"{GENERATION_SAMPLE}: tokens = eager greedy generation on its inputs"
    pixels = prompt_pixels(manifest)
    generation = vlm_generation(manifest)
    layout = {
        PIXEL_VALUES: (pixels.shape, pixels.dtype),
        INPUT_IDS: ([manifest.batch, generation.prompt.length], "int64"),
        "tokens": ([manifest.batch, generation.max_new_tokens], "int64"),
    }
    problems = array_problems(sample, layout)
    if not problems:
        try:
            want = eager_loop(pruned).generate(sample[PIXEL_VALUES], sample[INPUT_IDS], stop_at_eos=False)
        except Exception as err:  # a forged prompt eager cannot run
            return ShippedCheck(name, False, f"eager PyTorch cannot run its inputs ({type(err).__name__}: {err})"[:240])
        if not np.array_equal(sample["tokens"], want):
            problems.append(f"tokens differ from eager's ({first_difference(sample['tokens'], np.asarray(want))})")
    return ShippedCheck(name, not problems, "; ".join(problems[:4]))


ROW_REDUCTIONS = {
    LAST_ROW: "last prompt token's row, head mean",
    ALL_ROWS: "all prompt rows' mean, head mean",
    SPAN_ROWS: "the mean of prompt rows {span}, head mean",
}


def schedule_point(schedule: TokenSchedule) -> str:
    """Where a decoder schedule changes the image tokens, in words."""
    if len(schedule.transitions) == 1 and schedule.prunes:
        layer = schedule.prunes[0].layer
        return f"inside the prefill, before decoder layer {layer} (layers 0..{layer - 1} see every token)"
    steps = []
    for t in schedule.transitions:
        if isinstance(t, Prune):
            which = "" if t.images is None or len(schedule.per_image) == 1 else f" of {_image_names(t.images)}"
            steps.append(f"prune to {t.keep} image tokens{which} at layer {t.layer}")
        else:
            steps.append(f"re-admit every image token at layer {t.layer}")
    return "inside the prefill: " + ", then ".join(steps)


def schedule_taps(schedule: TokenSchedule) -> list[dict[str, Any]]:
    """The decoder taps a schedule's prunes read."""
    return [
        {
            "layer": layer,
            "stack": "decoder",
            "reduction": ROW_REDUCTIONS[spec.rows].format(span=spec.span and f"{spec.span[0]}..{spec.span[1] - 1}"),
        }
        for layer, spec in schedule.tapped_layers().items()
    ]


def render_ranges(ranges: list[dict[str, Any]]) -> str:
    """[{layers: [0, 1], image_tokens: 256}, ...] -> "layers 0-1: 256, 2-3: 40"."""
    return "layers " + ", ".join(f"{r['layers'][0]}-{r['layers'][1]}: {r['image_tokens']}" for r in ranges)


def _image_names(images: list[int] | tuple[int, ...]) -> str:
    return f"image {images[0]}" if len(images) == 1 else f"images {images[0]}-{images[-1]} together"


def render_images(layer_range: dict[str, Any]) -> str:
    """{per_image: [{images: [0], tokens: 138}, {images: [0, 1], tokens: 43}]} -> "image 0: 138 + images 0-1: 43 =
    181"."""
    parts = []
    for block in layer_range["per_image"]:
        parts.append(f"{_image_names(block['images'])}: {block['tokens']}")
    return " + ".join(parts) + f" = {layer_range['image_tokens']}"


def describe_vlm(the_plan: VlmPlan) -> dict[str, Any]:
    """The decoder side of a VLM plan: prompt and cache layout, the prefill taps, FLOPs against the unpruned model."""
    shots = {"shots": str(the_plan.prompt.images - 1)} if the_plan.prompt.images > 1 else {}
    unpruned = plan_vlm(replace(the_plan.request, method="none", keep=None, params=shots), the_plan.source)
    cache, prompt, schedule = the_plan.cache, the_plan.prompt, the_plan.schedule
    if not the_plan.method.prunes:
        point = "none: unpruned baseline (the projector and the decoder see every image token)"
        prefill_taps = []
    elif the_plan.prunes_in_prefill:
        point, prefill_taps = schedule_point(schedule), schedule_taps(schedule)
    else:
        point = "on the vision side: the projector and the decoder see only the kept tokens"
        prefill_taps = []
    flops, full = the_plan.flops(), unpruned.flops()
    first_token = flops["tower"] + flops["projector"] + flops["prefill"]
    full_first_token = full["tower"] + full["projector"] + full["prefill"]
    image_flops = cache.image_token_flops(the_plan.decoder)
    full_image_flops = unpruned.cache.image_token_flops(the_plan.decoder)
    before = prompt.all_image_tokens
    return {
        "prune_point": point,
        "prefill_taps": prefill_taps,
        "prompt": {
            "text_tokens": prompt.text_len,
            "image_start": prompt.image_start,
            "image_starts": list(prompt.image_starts),
            "length": prompt.length,
        },
        "tokens": {"before": before, "after": schedule.final_tokens},
        "tokens_per_layer": schedule.describe(cache.num_layers),
        "prefill_length": cache.prefill_tokens,
        "cache_capacity": list(cache.capacities),
        "flops": {"pruned": flops, "unpruned": full},
        "image_token_flops": {"pruned": image_flops, "unpruned": full_image_flops},
        "ideal_speedup": {
            "first_token": full_first_token / first_token,
            "decode_token": full["decode_token"] / flops["decode_token"],
        },
        "downstream_token_ratio": schedule.final_tokens / before,
    }


class VlmKind(Kind[VlmPlan]):
    def plan(self, request: PruneRequest, source: ModelSource) -> VlmPlan:
        return plan_vlm(request, source)

    def build(self, plan: VlmPlan) -> Pruned:
        return build_vlm(plan)

    def manifest_sections(self, plan: VlmPlan) -> dict[str, Any]:
        return {"generation": plan.generation()}

    def stage_costs(self, plan: VlmPlan) -> list[StageCost]:
        return plan.stage_costs(CostScale.of(plan.request))

    def tokens_before(self, plan: VlmPlan) -> int:
        return plan.prompt.all_image_tokens

    def write_samples(self, directory: Path, pruned: Pruned) -> None:
        pixels, ids = generation_inputs(pruned, seed=0)
        tokens = eager_loop(pruned).generate(pixels, ids, stop_at_eos=False)
        np.savez(directory / GENERATION_SAMPLE, pixel_values=pixels, input_ids=ids, tokens=tokens)

    def sample_files(self, manifest: Manifest) -> list[str]:
        return [GENERATION_SAMPLE]

    def check_samples(
        self, pruned: Pruned, manifest: Manifest, samples: dict[str, dict[str, np.ndarray]], tolerance: Tolerance
    ) -> list[ShippedCheck]:
        return [check_generation_sample(pruned, manifest, samples[GENERATION_SAMPLE])]

    def request_options(self, manifest: Manifest) -> dict[str, Any]:
        generation = vlm_generation(manifest)
        return {"prompt_len": generation.prompt.text_tokens, "max_new_tokens": generation.max_new_tokens}

    def entry_specs(self, manifest: Manifest) -> dict[str, TensorSpec]:
        pixels = prompt_pixels(manifest)
        prompt = TensorSpec(INPUT_IDS, [manifest.batch, vlm_generation(manifest).prompt.length], "int64")
        return {PIXEL_VALUES: pixels, INPUT_IDS: prompt}

    def entry_samples(self, pruned: Pruned, entry: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        ids = prefill_ids(pruned.plan.generation(), entry[INPUT_IDS])
        return as_arrays(chained_samples(pruned.plan, pruned.components, torch.from_numpy(entry[PIXEL_VALUES]), ids))

    def verify_runs(
        self,
        pruned: Pruned,
        manifest: Manifest,
        sessions: Sessions,
        seeds: list[int],
        tolerance: Tolerance,
        report: VerifyReport,
        step: Step,
    ) -> None:
        with step(f"greedy generation, {pruned.plan.max_new_tokens} tokens x {len(seeds)} prompts"):
            runs = {name: pair[0].run for name, pair in sessions.items()}
            loop = GenerationLoop(runs, vlm_generation(manifest))
            report.generation = check_generation(pruned, loop, seeds, tolerance)

    def describe(self, request: PruneRequest, source: ModelSource) -> dict[str, Any]:
        if request.keep is None:
            request = replace(request, keep=max(1, vlm_adapter(source).image_tokens(source.config) // 4))
        the_plan = plan_vlm(request, source)
        return {**tower_description(the_plan), **describe_vlm(the_plan)}

    def render(self, plan: dict[str, Any]) -> list[str]:
        lines = render_tower(plan)
        lines += [f"  tap decoder layer {tap['layer']}: {tap['reduction']}" for tap in plan["prefill_taps"]]
        prompt, tokens = plan["prompt"], plan["tokens"]
        images = len(prompt["image_starts"])
        where = f"image at {prompt['image_start']}" if images == 1 else f"{images} images at {prompt['image_starts']}"
        lines.append(
            f"prompt: {prompt['text_tokens']} text tokens, {where}; the prefill sees "
            f"{plan['prefill_length']} positions; KV cache capacity per layer {plan['cache_capacity']}"
        )
        lines.append(f"image tokens per decoder layer range: {render_ranges(plan['tokens_per_layer'])}")
        if images > 1:
            lines += [
                f"  layers {r['layers'][0]}-{r['layers'][1]}: {render_images(r)}" for r in plan["tokens_per_layer"]
            ]
        image_flops = plan["image_token_flops"]
        lines.append(
            f"image tokens: {tokens['before']} -> {tokens['after']} after the last transition "
            f"({100 * (1 - tokens['after'] / tokens['before']):.1f} % removed); image-token prefill GFLOPs "
            f"{image_flops['unpruned'] / 1e9:.3f} -> {image_flops['pruned'] / 1e9:.3f} "
            f"({100 * (1 - image_flops['pruned'] / image_flops['unpruned']):.1f} % fewer)"
        )
        pruned, full = plan["flops"]["pruned"], plan["flops"]["unpruned"]
        for stage in ("tower", "projector", "prefill", "decode_token"):
            lines.append(f"  {stage} GFLOPs: {full[stage] / 1e9:.3f} unpruned -> {pruned[stage] / 1e9:.3f}")
        ideal = plan["ideal_speedup"]
        lines.append(
            f"FLOPs-ideal speedup: first token {ideal['first_token']:.2f}x, decode {ideal['decode_token']:.2f}x"
        )
        return lines


KIND = VlmKind()
