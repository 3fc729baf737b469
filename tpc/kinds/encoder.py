"""The encoder kind: a CLIP/SigLIP vision tower pruned on the vision side, exported as one graph (`model`).

pixel_values -> kept_features (B, K, D), kept_indices (B, K). No prompt, no loop: verification compares the graph
on its samples, and the profile's headline is one call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import Tensor

from tpc.contract.cost import StageCost, total_flops
from tpc.contract.manifest import Manifest, TensorSpec
from tpc.contract.names import PIXEL_VALUES, SINGLE
from tpc.errors import UsageError
from tpc.kinds.base import (
    DTYPES,
    Component,
    CostScale,
    Kind,
    Pruned,
    PruneRequest,
    check_accepts,
    check_budget,
    check_layer,
    check_method_layers,
    resolve_keep,
    seeded_pixels,
    split_params,
    tower_costs,
)
from tpc.kinds.tower import render_tower, tower_description
from tpc.methods import VisionMethod, get_method
from tpc.models_zoo import ModelSource
from tpc.models_zoo.base import VisionEncoderAdapter
from tpc.passes.prune_vision import INPUT_NAMES, OUTPUT_NAMES, PrunedVisionEncoder, VisionCut


@dataclass(frozen=True)
class EncoderPlan:
    """A validated encoder request, before any weights are loaded: what `inspect` shows and `build` builds."""

    request: PruneRequest
    source: ModelSource
    method: VisionMethod
    keep: int
    feature_layer: int
    method_params: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        return {"feature_layer": self.feature_layer, **self.method_params}

    @property
    def adapter(self) -> VisionEncoderAdapter:
        adapter = self.source.adapter
        assert isinstance(adapter, VisionEncoderAdapter)  # an encoder family's model (the kind was chosen by it)
        return adapter

    @property
    def cut(self) -> VisionCut:
        geometry = self.source.geometry
        return VisionCut(self.adapter, geometry, self.method, self.keep, self.method_params, (self.feature_layer,))

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        return self.cut.tapped_layers

    def cache_bytes(self) -> int:
        return 0  # no decoder, no KV cache

    @property
    def kept_widths(self) -> tuple[int, ...]:
        return (self.keep,) if self.method.prunes else ()

    @property
    def depth(self) -> int:
        """Encoder layers the pruned graph runs."""
        return self.cut.depth

    def stage_costs(self, scale: CostScale) -> list[StageCost]:
        """The graph's one call: the tower to its depth, its taps, and the select when the method prunes."""
        kept = self.keep if self.method.prunes else None
        return tower_costs(SINGLE, self.source.geometry, self.depth, len(self.tapped_layers), kept, scale)

    def full_encoder_flops(self) -> int:
        """Every layer of the encoder on every token: what the exported graph is measured against."""
        geometry = self.source.geometry
        return total_flops(tower_costs(SINGLE, geometry, geometry.num_layers, 0, None, CostScale()))


def plan_encoder(request: PruneRequest, source: ModelSource) -> EncoderPlan:
    if request.prompt_len is not None or request.max_new_tokens is not None:
        raise UsageError("--prompt-len and --max-new-tokens apply to VLM models; vision encoders take no prompt")
    method = get_method(request.method)
    check_accepts(source.adapter, method, "prunes at the {stage} stage, which {family} vision encoders do not have")
    assert isinstance(method, VisionMethod)  # what an encoder accepts
    geometry = source.geometry
    method_params, feature_layer = split_params(request.params)
    # LLaVA's default: the penultimate layer's output (vision_feature_layer = -2)
    feature_layer = feature_layer if feature_layer is not None else max(1, geometry.num_layers - 1)
    check_layer("feature_layer", feature_layer, geometry.num_layers)
    params = method.resolve_params(method_params, method.model_defaults(geometry.num_layers, feature_layer))
    check_method_layers(method, params, {"encoder": (1, geometry.num_layers)})
    keep = resolve_keep(request.keep, method, geometry.num_patches)
    check_budget(method, keep, params)
    return EncoderPlan(request, source, method, keep, feature_layer, params)


def build_encoder(the_plan: EncoderPlan) -> Pruned:
    """Load through `from_pretrained`, insert the taps and the prune point."""
    source, request = the_plan.source, the_plan.request
    model = the_plan.adapter.load(source.path)
    model.to(DTYPES[request.dtype])  # type: ignore[arg-type]  # transformers wraps .to; mypy does not bind self
    module = PrunedVisionEncoder(model, the_plan.cut).eval()
    component = Component(SINGLE, module, INPUT_NAMES, OUTPUT_NAMES)

    def samples(seed: int) -> dict[str, dict[str, Tensor]]:
        return {SINGLE: {PIXEL_VALUES: seeded_pixels(source, request, seed)}}

    return Pruned(request, the_plan, {SINGLE: component}, samples)


class EncoderKind(Kind[EncoderPlan]):
    def plan(self, request: PruneRequest, source: ModelSource) -> EncoderPlan:
        return plan_encoder(request, source)

    def build(self, plan: EncoderPlan) -> Pruned:
        return build_encoder(plan)

    def stage_costs(self, plan: EncoderPlan) -> list[StageCost]:
        return plan.stage_costs(CostScale.of(plan.request))

    def tokens_before(self, plan: EncoderPlan) -> int:
        return plan.source.geometry.num_patches

    def entry_specs(self, manifest: Manifest) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in manifest.components[0].inputs}

    def entry_samples(self, pruned: Pruned, entry: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        return {SINGLE: entry}

    def render(self, plan: dict[str, Any]) -> list[str]:
        flops = plan["flops"]
        return [
            *render_tower(plan),
            f"encoder GFLOPs: {flops['encoder_full'] / 1e9:.3f} full -> {flops['pruned_graph'] / 1e9:.3f} exported",
        ]

    def describe(self, request: PruneRequest, source: ModelSource) -> dict[str, Any]:
        if request.keep is None:
            request = replace(request, keep=max(1, source.geometry.num_patches // 4))
        the_plan = plan_encoder(request, source)
        geometry = source.geometry
        point = f"after encoder layer {the_plan.feature_layer} (the feature layer), before the projector"
        if not the_plan.method.prunes:
            point = f"none: unpruned baseline (every patch token of encoder layer {the_plan.feature_layer} is kept)"
        return {
            **tower_description(the_plan),
            "prune_point": point,
            "tokens": {"before": geometry.num_patches, "after": the_plan.keep},
            "flops": {
                "encoder_full": the_plan.full_encoder_flops(),
                "pruned_graph": total_flops(the_plan.stage_costs(CostScale())),
            },
            "downstream_token_ratio": the_plan.keep / geometry.num_patches,
        }


KIND = EncoderKind()
Plan = EncoderPlan  # the name tpc.pipeline has always exported
