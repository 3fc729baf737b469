"""Every method tpc knows, as its light declaration: name, stage, summary, reference, typed parameters with their
domains, the layers it taps, its model-derived defaults and budget rule, and its priority function by name.

Listing (`tpc methods`) and planning (`tpc inspect`, the checks before an export) read these records without
importing torch; the priority functions live in the method modules (`tpc.methods.hiprune`, ...) with the rest
of each method's tensor functions and are imported on first call (`Deferred`). Pure helpers that both a record
and its tensor module need (HiPrune's anchor count and budget rule) are defined here and imported there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tpc.methods.base import Deferred, Method, Param, PrefillMethod, VisionMethod, VisionSignals
from tpc.methods.schedule import ALL_ROWS, LAST_ROW, Prune

if TYPE_CHECKING:
    from torch import Tensor

# --- HiPrune (docs/methods.md#hiprune) ---------------------------------------------------------------------

DEFAULT_ALPHA = 0.1
# LLaVA-1.5's CLIP ViT-L/14-336: object layer 9 of 24 (1-based). Other depths scale it.
REFERENCE_OBJECT_LAYER, REFERENCE_DEPTH = 9, 24


def anchor_count(keep: int, alpha: float = DEFAULT_ALPHA) -> int:
    """k_a = round(keep * alpha / 5) with Python's round-half-to-even, as the reference."""
    return round(keep * alpha / 5)


def check_budget(keep: int, alpha: float) -> None:
    """The reference fails (negative top-k) when anchors + buffers outgrow the budget; refuse such configs."""
    k_a = anchor_count(keep, alpha)
    if 5 * k_a > keep:
        raise ValueError(
            f"alpha={alpha} gives {k_a} anchor(s), whose {5 * k_a} anchor+buffer slots can exceed keep={keep}; "
            "lower alpha or raise keep"
        )


def default_object_layer(num_layers: int) -> int:
    """Object layer 9 of 24 scaled to the encoder's depth (1-based, at least 1)."""
    return max(1, round(num_layers * REFERENCE_OBJECT_LAYER / REFERENCE_DEPTH))


def default_deep_layer(num_layers: int, feature_layer: int, feature_index: int | list[int] | None = None) -> int:
    """The register layer: the layer whose attention the reference pairs with the features (§1.2).

    The reference scores `attentions[i]` for the features `hidden_states[i]`, i = `vision_feature_layer`.
    hidden_states[0] is the embeddings, attentions[0] is layer 1, so for i >= 0 that is layer i + 1, one past
    the feature layer i; for i < 0 both count from the end and name the same layer (-2: the penultimate).
    Without an index (a bare encoder, `feature_layer` given 1-based) the deep layer is the feature layer.
    A list of indices takes the deepest such layer. i = depth (the last layer's output) would index past the
    reference's attentions (it fails); tpc uses the last layer then.
    """
    if feature_index is None:
        return feature_layer
    indices = feature_index if isinstance(feature_index, list | tuple) else [feature_index]
    layers = [index + 1 if index >= 0 else num_layers + 1 + index for index in indices]
    return min(max(layers), num_layers)


HIPRUNE = VisionMethod(
    name="hiprune",
    summary="anchors (object-layer attention) + raster-neighbour buffers + registers (deep-layer attention)",
    reference="Danielement321/HiPrune @6e83a12, arXiv 2508.00553 (a VLM's vision_feature_layer p >= 0: registers "
    "from layer p+1, the reference's attentions[p])",
    params=(
        Param(
            "alpha",
            float,
            DEFAULT_ALPHA,
            "share of the budget for anchors + buffers (k_a = round(keep*alpha/5))",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param("object_layer", int, None, "encoder layer of the anchor attention (default: 9 of 24, scaled)", "encoder"),
        Param(
            "deep_layer",
            int,
            None,
            "encoder layer of the register attention (default: the feature layer; a VLM's positive "
            "vision_feature_layer p: p+1, the reference's attentions[p])",
            "encoder",
        ),
    ),
    tapped_layers=lambda params: (params["object_layer"], params["deep_layer"]),
    model_defaults=lambda depth, feature_layer, feature_index=None: {
        "object_layer": default_object_layer(depth),
        "deep_layer": default_deep_layer(depth, feature_layer, feature_index),
    },
    check_budget=lambda keep, params: check_budget(keep, params["alpha"]),
    priority=Deferred("tpc.methods.hiprune:_priority_from_signals"),
)

# --- vision-side baselines -------------------------------------------------------------------------------------

DIVPRUNE = VisionMethod(
    name="divprune",
    summary="greedy max-min cosine diversity of the image tokens (a VLM: their LLM input embeddings)",
    reference="vbdi/divprune @799e2d9, CVPR 2025",
    priority=Deferred("tpc.methods.divprune:_priority_from_signals"),
)

RANDOM = VisionMethod(
    name="random",
    summary="seeded random tokens, fixed at build time (control)",
    reference="control baseline",
    params=(Param("seed", int, 0, "seed of the token choice", low=0),),
    priority=Deferred("tpc.methods.random:_priority_from_signals"),
)

UNIFORM = VisionMethod(
    name="uniform",
    summary="raster stride i*floor(N/K) (control)",
    reference="LVLM_CSP uniform sampler, arXiv 2504.10854",
    priority=Deferred("tpc.methods.uniform:_priority_from_signals"),
)


def _no_priority(signals: VisionSignals, keep: int, params: dict[str, Any]) -> Tensor:
    return signals.features.new_zeros(signals.features.shape[:2])


NONE = VisionMethod(
    name="none",
    summary="no pruning: all tokens kept (baseline)",
    reference="-",
    priority=_no_priority,
    prunes=False,
)

# --- LLM-prefill methods ---------------------------------------------------------------------------------------

FASTV = PrefillMethod(
    name="fastv",
    summary="last-token attention row at LLM layer K-1; prunes from layer K on; selected once, at prefill (the "
    "KV cache of layers K.. holds only the kept tokens)",
    reference="pkunlp-icler/FastV, ECCV 2024 (its authors evaluate without a KV cache, re-selecting the image "
    "tokens at every generated token; tpc selects once at prefill, as FastV's KV-cache variant does)",
    priority=lambda signals, keep, params: signals.scores,
    transitions=lambda params, keep, image_tokens: (Prune(params["layer"], keep, LAST_ROW),),
    params=(Param("layer", int, 2, "decoder layer K (0-based) from which image tokens are pruned", "decoder"),),
)

VLA_CRITERIA = ("prefill", "last")
VLA_ORDERS = ("oldest-heaviest", "newest-heaviest")
VLA_GUIDE_DTYPES = ("bf16", "fp32")  # tpc.methods.vla_pruner.GUIDE_DTYPES maps them to torch dtypes
REFERENCE_HISTORY_LAYER = 15  # hard-coded in the reference's predict_action, for the 32-layer Llama-2-7B
MAX_WINDOW = 64  # each verified episode runs window + 5 steps; the reference uses 3


def _check_vla_layers(keep: int, params: dict[str, Any]) -> None:
    if params["history_layer"] < params["layer"]:
        raise ValueError(
            f"history_layer {params['history_layer']} must not precede the prune layer {params['layer']} "
            "(the action attention is read over the kept tokens)"
        )


VLA_PRUNER = PrefillMethod(
    name="vla-pruner",
    summary="semantic (layer K-1) + temporally smoothed action attention, union, max-min diversity; state per step",
    reference="MINT-SJTU VLA-Pruner (OpenVLA path), arXiv 2511.16449",
    priority=Deferred("tpc.methods.vla_pruner:_priority"),
    transitions=lambda params, keep, image_tokens: (
        Prune(params["layer"], keep, ALL_ROWS if params["criterion"] == "prefill" else LAST_ROW),
    ),
    params=(
        Param("layer", int, 3, "decoder layer K (0-based) from which image tokens are pruned (fastv_k)", "decoder"),
        Param(
            "criterion", str, "prefill", "semantic score: all prompt rows' mean, or the last row", choices=VLA_CRITERIA
        ),
        Param("history_layer", int, REFERENCE_HISTORY_LAYER, "action-attention layer (shallower: last)", "decoder"),
        Param(
            "window", int, 3, "control steps the history holds (warm-up steps keep every token)", low=1, high=MAX_WINDOW
        ),
        Param("decay", float, 0.8, "temporal decay of the history weights", low=0.0, high=1.0, low_open=True),
        Param("order", str, "oldest-heaviest", "history weight order: main branch, or OFT's", choices=VLA_ORDERS),
        Param("guide_dtype", str, "bf16", "the guide's rounding before its top-K", choices=VLA_GUIDE_DTYPES),
    ),
    model_defaults=lambda depth: {"history_layer": min(REFERENCE_HISTORY_LAYER, depth - 1)},
    check_budget=_check_vla_layers,
    stateful=True,
)

REGISTRY: dict[str, Method] = {m.name: m for m in (HIPRUNE, DIVPRUNE, RANDOM, UNIFORM, FASTV, VLA_PRUNER, NONE)}
