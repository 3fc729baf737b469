"""`tpc inspect`: the plan of a pruned export, computed from the config alone (no weights are loaded).

Shows what will be tapped and what it costs next to asking for `output_attentions`, where the prune point is, and
tokens and FLOPs before and after, so a user can check a budget before spending an export on it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from tpc.contract.manifest import Manifest, changed_files
from tpc.models_zoo import resolve
from tpc.passes.attention_tap import ReceivedAttention
from tpc.pipeline import Plan, PruneRequest, plan

FLOAT32_BYTES = 4


def describe(request: PruneRequest) -> dict[str, Any]:
    """The plan as plain data (the CLI renders it; `--json` writes it). Without a keep, plans a quarter of the
    visual tokens, so a user can see the plan before choosing a budget."""
    source = resolve(request.model)
    if source.adapter.kind == "vla":
        return _describe_policy(request, source)
    if request.keep is None:
        tokens = source.adapter.image_tokens(source.config) if source.adapter.kind == "vlm" else None
        request = replace(request, keep=max(1, (tokens or source.geometry.num_patches) // 4))
    the_plan = plan(request, source)
    geometry = the_plan.source.geometry
    batch, heads, seq = request.batch, geometry.num_heads, geometry.sequence_length
    tap = ReceivedAttention()
    rows = tap.rows_per_block(batch, heads, seq, seq)
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
    description = {
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
    if isinstance(the_plan, Plan):
        full_encoder = geometry.num_layers * geometry.layer_flops(seq)
        point = f"after encoder layer {the_plan.feature_layer} (the feature layer), before the projector"
        if not the_plan.method.prunes:
            point = f"none: unpruned baseline (every patch token of encoder layer {the_plan.feature_layer} is kept)"
        return {
            **description,
            "prune_point": point,
            "tokens": {"before": geometry.num_patches, "after": the_plan.keep},
            "flops": {"encoder_full": full_encoder, "pruned_graph": cut.depth * geometry.layer_flops(seq)},
            "downstream_token_ratio": the_plan.keep / geometry.num_patches,
        }
    return {**description, **_describe_vlm(the_plan)}


def _describe_vlm(the_plan: Any) -> dict[str, Any]:
    """The decoder side of a VLM plan: prompt and cache layout, the prefill tap, FLOPs against the unpruned model."""
    unpruned = plan(replace(the_plan.request, method="none", keep=None, params={}), the_plan.source)
    cache, prompt = the_plan.cache, the_plan.prompt
    if not the_plan.method.prunes:
        point = "none: unpruned baseline (the projector and the decoder see every image token)"
        prefill_taps = []
    elif the_plan.prunes_in_prefill:
        layer = the_plan.method.prune_layer(the_plan.method_params)
        point = f"inside the prefill, before decoder layer {layer} (layers 0..{layer - 1} see every token)"
        prefill_taps = [{"layer": layer - 1, "stack": "decoder", "reduction": "last prompt token's row, head mean"}]
    else:
        point = "on the vision side: the projector and the decoder see only the kept tokens"
        prefill_taps = []
    flops, full = the_plan.flops(), unpruned.flops()
    first_token = flops["tower"] + flops["projector"] + flops["prefill"]
    full_first_token = full["tower"] + full["projector"] + full["prefill"]
    return {
        "prune_point": point,
        "prefill_taps": prefill_taps,
        "prompt": {"text_tokens": prompt.text_len, "image_start": prompt.image_start, "length": prompt.length},
        "tokens": {"before": prompt.image_tokens, "after": the_plan.keep},
        "prefill_length": cache.prefill_tokens,
        "cache_capacity": list(cache.capacities),
        "flops": {"pruned": flops, "unpruned": full},
        "ideal_speedup": {
            "first_token": full_first_token / first_token,
            "decode_token": full["decode_token"] / flops["decode_token"],
        },
        "downstream_token_ratio": the_plan.keep / prompt.image_tokens,
    }


def _describe_policy(request: PruneRequest, source: Any) -> dict[str, Any]:
    """A policy's control step: where it prunes, what it taps, its state, FLOPs per step against the unpruned one."""
    if request.keep is None:
        request = replace(request, keep=source.adapter.policy(source.config).image_tokens // 4)
    the_plan = plan(request, source)
    full = plan(replace(request, method="none", keep=None, params={}), source).flops()
    flops, params = the_plan.flops(), the_plan.method_params
    taps = []
    if the_plan.method.prunes:
        layer = the_plan.method.prune_layer(params)
        rows = the_plan.method.score_rows(params)
        taps.append({"layer": layer - 1, "reduction": f"semantic score: head mean, {rows} of the prompt"})
        point = f"inside the prefill, before decoder layer {layer} (layers 0..{layer - 1} see every token)"
    else:
        point = "none: every image token reaches every decoder layer"
    if the_plan.stateful:
        taps.append({"layer": params["history_layer"], "reduction": "action attention: the 7 action queries' rows"})
    policy = the_plan.policy()
    return {
        "model": source.ref,
        "family": source.adapter.family,
        "kind": "policy",
        "method": the_plan.method.name,
        "params": the_plan.params,
        "prune_point": point,
        "taps": taps,
        "tokens": {"before": the_plan.prompt.image_tokens, "after": the_plan.keep},
        "prompt": policy["prompt"],
        "graphs": policy["graphs"],
        "state": policy["state"],
        "decoder_lengths": policy["decoder_lengths"],
        "flops": {"pruned": flops, "unpruned": full},
        "ideal_speedup": {"step": full["step"] / flops["step"]},
    }


def describe_export(directory: Path) -> dict[str, Any]:
    """An export directory as plain data: what it holds, its static I/O, and each component's target report
    (the ExecuTorch delegation table, Core ML's MIL ops and Neural Engine notes, ONNX op counts).
    `changed_files`: files that no longer match the sha256 recorded at export (or are gone, or were added
    since), for which `verification` is void."""
    manifest = Manifest.read(directory)
    changed, missing, added = changed_files(directory, manifest)
    return {
        "directory": str(directory),
        "model": manifest.model["ref"],
        "method": manifest.method,
        "keep": manifest.keep,
        "target": manifest.target,
        "dtype": manifest.dtype,
        "tokens": manifest.tokens,
        "verification": manifest.verification,  # as recorded at export
        "changed_files": changed + missing + added,  # since export: the recorded verification no longer applies to them
        "components": [
            {
                "name": spec.name,
                "artifact": spec.artifact,
                "method": spec.method,
                "inputs": {s.name: f"{s.dtype}{s.shape}" for s in spec.inputs},
                "outputs": {s.name: f"{s.dtype}{s.shape}" for s in spec.outputs},
                "graph": spec.graph,
            }
            for spec in manifest.methods  # a staged policy step as its prefill and decode methods
        ],
    }
