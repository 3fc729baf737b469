"""`tpc inspect`: the plan of a pruned export, computed from the config alone (no weights are loaded).

Shows what will be tapped and what it costs next to asking for `output_attentions`, where the prune point is, and
tokens and FLOPs before and after, so a user can check a budget before spending an export on it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tpc.models_zoo import resolve
from tpc.passes.attention_tap import ReceivedAttention
from tpc.pipeline import Plan, PruneRequest, plan

FLOAT32_BYTES = 4


def describe(request: PruneRequest) -> dict[str, Any]:
    """The plan as plain data (the CLI renders it; `--json` writes it). Without a keep, plans a quarter of the
    patch tokens, so a user can see the plan before choosing a budget."""
    source = resolve(request.model)
    if request.keep is None:
        request = replace(request, keep=max(1, source.geometry.num_patches // 4))
    the_plan: Plan = plan(request, source)
    geometry = the_plan.source.geometry
    batch, heads, seq = request.batch, geometry.num_heads, geometry.sequence_length
    tap = ReceivedAttention()
    rows = tap.rows_per_block(batch, heads, seq, seq)
    taps = [
        {
            "layer": layer,
            "reduction": "attention received: mean over heads and all query rows, per key",
            "rows_per_block": rows,
            "block_bytes": batch * heads * rows * seq * FLOAT32_BYTES,
        }
        for layer in the_plan.tapped_layers
    ]
    full_encoder = geometry.num_layers * geometry.layer_flops(seq)
    pruned_graph = the_plan.depth * geometry.layer_flops(seq)
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
        "prune_point": f"after encoder layer {the_plan.feature_layer} (the feature layer), before the projector",
        "layers_run": the_plan.depth,
        "tokens": {"before": geometry.num_patches, "after": the_plan.keep},
        "flops": {"encoder_full": full_encoder, "pruned_graph": pruned_graph},
        "downstream_token_ratio": the_plan.keep / geometry.num_patches,
    }
