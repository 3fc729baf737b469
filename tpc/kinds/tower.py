"""What an encoder and a VLM share in `tpc inspect`: the vision tower's geometry, its taps and their memory."""

from __future__ import annotations

from typing import Any, Protocol

from tpc.kinds.base import KindPlan
from tpc.passes.attention_tap import ReceivedAttention

FLOAT32_BYTES = 4


class TowerCut(Protocol):
    """What `tpc inspect` reads of a pruned tower (`VisionCut`, `QwenCut`): its taps and the layers it runs."""

    @property
    def tapped_layers(self) -> tuple[int, ...]: ...

    @property
    def depth(self) -> int: ...

    @property
    def tap_reduction(self) -> str: ...


class TowerPlan(KindPlan, Protocol):
    """A plan whose vision graph runs a pruned (or unpruned) tower: an encoder's, a VLM's."""

    @property
    def cut(self) -> TowerCut: ...


def tower_description(the_plan: TowerPlan) -> dict[str, Any]:
    """What an encoder and a VLM's vision side share in `tpc inspect`: geometry, taps and their memory."""
    request, geometry = the_plan.request, the_plan.source.geometry
    batch, heads, seq = request.batch, geometry.num_heads, geometry.sequence_length
    rows = ReceivedAttention().rows_per_block(batch, heads, seq, seq)
    cut = the_plan.cut
    taps = [
        {
            "layer": layer,
            "stack": "vision encoder",
            "reduction": cut.tap_reduction,
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
