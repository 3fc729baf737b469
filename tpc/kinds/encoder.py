"""The encoder kind: a CLIP/SigLIP vision tower pruned on the vision side, exported as one graph (`model`).

pixel_values -> kept_features (B, K, D), kept_indices (B, K). No prompt, no loop: verification compares the graph
on its samples, and the profile's headline is one call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from tpc.contract.manifest import Manifest, TensorSpec
from tpc.contract.names import PIXEL_VALUES, SINGLE
from tpc.errors import UsageError
from tpc.kinds import KINDS
from tpc.kinds.base import (
    DTYPES,
    Component,
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
)
from tpc.methods import VisionMethod, get_method
from tpc.models_zoo import ModelSource
from tpc.models_zoo.base import VisionEncoderAdapter
from tpc.passes.attention_tap import ReceivedAttention
from tpc.passes.prune_vision import INPUT_NAMES, OUTPUT_NAMES, PrunedVisionEncoder, VisionCut

if TYPE_CHECKING:
    from tpc.kinds.vlm import VlmPlan

FLOAT32_BYTES = 4


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


def tower_description(the_plan: EncoderPlan | VlmPlan) -> dict[str, Any]:
    """What an encoder and a VLM's vision side share in `tpc inspect`: geometry, taps and their memory."""
    request, geometry = the_plan.request, the_plan.source.geometry
    batch, heads, seq = request.batch, geometry.num_heads, geometry.sequence_length
    rows = ReceivedAttention().rows_per_block(batch, heads, seq, seq)
    cut = the_plan.cut
    taps = [
        {
            "layer": layer,
            "stack": "vision encoder",
            "reduction": "attention received: mean over heads and all query rows, per key",
            "rows_per_block": rows,
            "block_bytes": batch * heads * rows * seq * FLOAT32_BYTES,
        }
        for layer in cut.tapped_layers
    ]
    return {
        "model": the_plan.source.ref,
        "family": the_plan.source.adapter.family,
        "geometry": {
            "image_size": geometry.image_size,
            "patch_size": geometry.patch_size,
            "grid": list(geometry.grid),
            "prefix_tokens": geometry.prefix_tokens,
            "layers": geometry.num_layers,
            "hidden_size": geometry.hidden_size,
            "heads": heads,
        },
        "method": the_plan.method.name,
        "params": the_plan.params,
        "taps": taps,
        "output_attentions_bytes": geometry.num_layers * batch * heads * seq * seq * FLOAT32_BYTES,
        "layers_run": cut.depth,
    }


def render_tower(plan: dict[str, Any]) -> list[str]:
    """The vision side of `tpc inspect`'s text: geometry, method, taps, prune point, tokens."""
    g = plan["geometry"]
    lines = [
        f"[bold]{plan['model']}[/bold] ({plan['family']}): {g['layers']} layers, d={g['hidden_size']}, "
        f"{g['heads']} heads, {g['image_size']}px / {g['patch_size']} -> {g['grid'][0]}x{g['grid'][1]} patches"
        f" + {g['prefix_tokens']} prefix",
        f"method {plan['method']}, params {plan['params']}",
    ]
    for tap in plan["taps"]:
        lines.append(
            f"  tap layer {tap['layer']}: {tap['reduction']}; {tap['rows_per_block']} query rows per block, "
            f"{tap['block_bytes'] / 2**20:.1f} MiB per block"
        )
    if plan["taps"]:
        mib = plan["output_attentions_bytes"] / 2**20
        lines.append(f"  (asking for output_attentions would hold {mib:.1f} MiB of maps)")
    lines.append(
        f"prune point: {plan['prune_point']}; the vision graph runs {plan['layers_run']} of {g['layers']} layers"
    )
    tokens = plan["tokens"]
    lines.append(
        f"tokens: {tokens['before']} -> {tokens['after']} ({plan['downstream_token_ratio']:.1%} handed downstream)"
    )
    return lines


class EncoderKind(Kind[EncoderPlan]):
    record = KINDS["encoder"]

    def plan(self, request: PruneRequest, source: ModelSource) -> EncoderPlan:
        return plan_encoder(request, source)

    def build(self, plan: EncoderPlan) -> Pruned:
        return build_encoder(plan)

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
        geometry, seq = source.geometry, source.geometry.sequence_length
        point = f"after encoder layer {the_plan.feature_layer} (the feature layer), before the projector"
        if not the_plan.method.prunes:
            point = f"none: unpruned baseline (every patch token of encoder layer {the_plan.feature_layer} is kept)"
        return {
            **tower_description(the_plan),
            "prune_point": point,
            "tokens": {"before": geometry.num_patches, "after": the_plan.keep},
            "flops": {
                "encoder_full": geometry.num_layers * geometry.layer_flops(seq),
                "pruned_graph": the_plan.cut.depth * geometry.layer_flops(seq),
            },
            "downstream_token_ratio": the_plan.keep / geometry.num_patches,
        }


KIND = EncoderKind()
Plan = EncoderPlan  # the name tpc.pipeline has always exported
