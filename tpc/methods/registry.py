"""Every method tpc knows, as its light declaration: name, stage, summary, reference, typed parameters with their
domains, the layers it taps, its model-derived defaults and budget rule, and its priority function by name.

Listing (`tpc methods`) and planning (`tpc inspect`, the checks before an export) read these records without
importing torch; the priority functions live in the method modules (`tpc.methods.hiprune`, ...) with the rest
of each method's tensor functions and are imported on first call (`Deferred`). Pure helpers that both a record
and its tensor module need (HiPrune's anchor count and budget rule) are defined here and imported there.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from tpc.contract.names import CLS_ATTENTION
from tpc.methods.base import Deferred, Method, Param, PrefillMethod, VisionMethod, VisionSignals
from tpc.methods.schedule import ALL_ROWS, FROZEN, LAST_ROW, REPRESENTATIVE, PromptImages, Prune, Readmit, Transition

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
    transitions=lambda params, keep, prompt: (Prune(params["layer"], keep, LAST_ROW),),
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
    transitions=lambda params, keep, prompt: (
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

# --- CATP (docs/methods.md#catp) -----------------------------------------------------------------------------

# LLaVA-NeXT-7B, InternVL2.5-8B, Qwen2.5-VL-7B: stage 2 at layer K = 6 of 32 (the paper's Implementation details)
REFERENCE_CATP_LAYER, REFERENCE_CATP_DEPTH = 6, 32
CATP_HIDDEN = ("input", "output")  # A4: the hidden state entering the paper's layer K, or what it outputs
CATP_CONTEXT_MEAN = ("images", "all")  # A6: v_c over the kept context's image tokens, or every context token
CATP_POSITIONS = ("original", "compact")  # A3: after stage 1, original position ids or renumbered 0, 1, ...


def catp_default_layer(depth: int) -> int:
    """Layer 6 of 32 scaled to the decoder's depth; at least 2 (two tapped layers before it), at most depth - 2
    (the query's prune at K+1 must be a decoder layer)."""
    return min(max(2, round(depth * REFERENCE_CATP_LAYER / REFERENCE_CATP_DEPTH)), max(2, depth - 2))


def catp_budget(keep: int, prompt: PromptImages, stage1_keep: int | None) -> tuple[tuple[int, ...], int, int]:
    """(tokens each image keeps after stage 1, the context's total after layer K, the query's after K+1).

    `keep` = what the decoder keeps after layer K+1, so the prune ratio is R = 1 - keep/N over all N image tokens;
    stage 1 removes R/2 of each image: floor(S_i (1 - R/2)) = floor(S_i (N + keep) / 2N); after K+1 the context and
    the query each keep (1 - R) of their own tokens, the context's share rounded (half to even), the query's the rest.
    """
    total, query = prompt.image_tokens, prompt.tokens[-1]
    first = tuple(
        stage1_keep if stage1_keep is not None else tokens * (total + keep) // (2 * total) for tokens in prompt.tokens
    )
    context_keep = round(keep * (total - query) / total)
    query_keep = keep - context_keep
    if context_keep < 1 or query_keep < 1:
        raise ValueError(f"keep {keep} leaves {context_keep} context and {query_keep} query tokens; raise --keep")
    if context_keep > sum(first[:-1]) or query_keep > first[-1]:
        raise ValueError(
            f"keep {keep} is more than stage 1 leaves: the context keeps {context_keep} of {sum(first[:-1])} and the "
            f"query {query_keep} of {first[-1]} (lower --keep or raise stage1_keep)"
        )
    return first, context_keep, query_keep


def _catp_transitions(params: dict[str, Any], keep: int, prompt: PromptImages) -> tuple[Transition, ...]:
    images = len(prompt.tokens)
    if images < 2:
        raise ValueError("catp prunes an in-context prompt: at least one example image before the query image")
    first, context_keep, query_keep = catp_budget(keep, prompt, params["stage1_keep"])
    layer, query = params["layer"], images - 1
    if layer < 2:
        raise ValueError(f"layer={layer}: stage 2 compares the attention of layers K-1 and K-2, so K >= 2")
    context = tuple(range(query))
    compact = params["positions"] == "compact"
    stage1 = tuple(
        Prune(
            0,
            first[i],
            rows=None,
            images=(i,),
            renumber=compact,
            priority=functools.partial(Deferred("tpc.methods.catp:stage1_from_signals"), text=prompt.text_after(i)),
        )
        for i in range(images)
    )
    query_start = prompt.starts[query]
    stage2 = Prune(
        layer,
        context_keep,
        LAST_ROW,
        previous=True,
        images=context,
        priority=functools.partial(Deferred("tpc.methods.catp:context_from_signals"), query_start=query_start),
    )
    spans = (
        tuple(prompt.span(i) for i in context)
        if params["context_mean"] == "images"
        else ((prompt.starts[0], query_start),)
    )
    stage3 = Prune(
        layer + 1,
        query_keep,
        rows=None,
        images=(query,),
        priority=functools.partial(Deferred("tpc.methods.catp:query_from_signals"), context=spans),
    )
    return (*stage1, stage2, stage3)


CATP = PrefillMethod(
    name="catp",
    summary="n-shot prompts: per-image facility-location + text-alignment greedy after the projector; at layer K the "
    "context images by attention change + similarity to the query; at K+1 the query image by similarity to the "
    "kept context",
    reference="Li et al., AAAI-26, arXiv 2508.07871 (no public code: the paper's formulas, open points A1-A6 in "
    "docs/methods.md)",
    priority=Deferred("tpc.methods.catp:context_from_signals"),
    transitions=_catp_transitions,
    params=(
        Param("lambda1", float, 0.7, "stage 1: weight of the alignment with the paired text", low=0.0),
        Param("lambda2", float, 0.6, "stage 2: weight of the similarity to the query sample", low=0.0),
        Param(
            "layer",
            int,
            None,
            "decoder layer K (0-based) before which the context is pruned; the query before K+1 (default: 6 of 32, "
            "scaled)",
            "decoder",
        ),
        Param(
            "hidden",
            str,
            "input",
            "A4: the hidden states stages 2 and 3 compare: entering the paper's layer K (input) or its output",
            choices=CATP_HIDDEN,
        ),
        Param(
            "context_mean",
            str,
            "images",
            "A6: the query's reference at K+1: the kept context's image tokens, or all context tokens",
            choices=CATP_CONTEXT_MEAN,
        ),
        Param(
            "positions",
            str,
            "original",
            "A3: position ids after stage 1: original, or renumbered as if the dropped tokens never existed",
            choices=CATP_POSITIONS,
        ),
        Param("stage1_keep", int, None, "tokens each image keeps after stage 1 (default: floor(S(1 - R/2)))", low=1),
    ),
    model_defaults=lambda depth: {"layer": catp_default_layer(depth)},
    shots=(1, 2),
)

# --- LVLM_CSP (docs/methods.md#lvlm-csp) -----------------------------------------------------------------------

CSP_SAMPLERS = ("uniform", "random", "cls-attention")
CSP_READMIT = ("representative", "embedding")
# LLaVA-1.5-7B (32 layers, 576 image tokens) at keep 64: representatives N/4 in layers 0-7, all tokens in 8-15,
# keep from 16 on remove 63 % of the image-token layer passes, the paper's "~65 % fewer image-token FLOPs"
CSP_CLUSTER_END, CSP_PRUNE_START, CSP_DEPTH = 8, 16, 32


def csp_default_layers(depth: int) -> dict[str, int]:
    cluster_end = max(1, round(depth * CSP_CLUSTER_END / CSP_DEPTH))
    return {"cluster_end": cluster_end, "prune_start": max(cluster_end + 1, round(depth * CSP_PRUNE_START / CSP_DEPTH))}


def _csp_transitions(params: dict[str, Any], keep: int, prompt: PromptImages) -> tuple[Transition, ...]:
    total = prompt.image_tokens
    count = params["representatives"] if params["representatives"] is not None else max(1, total // 4)
    if count > total:
        raise ValueError(f"representatives={count} is more than the prompt's {total} image tokens")
    if not params["cluster_end"] < params["prune_start"]:
        raise ValueError(
            f"cluster_end={params['cluster_end']} must come before prune_start={params['prune_start']} "
            "(clustering layers, then scattering layers, then pruning layers)"
        )
    sampler = functools.partial(Deferred("tpc.methods.lvlm_csp:representatives_from_signals"), count=count)
    return (
        Prune(0, count, rows=None, priority=sampler),
        Readmit(params["cluster_end"], REPRESENTATIVE if params["readmit"] == "representative" else FROZEN),
        Prune(params["prune_start"], keep, LAST_ROW),
    )


LVLM_CSP = PrefillMethod(
    name="lvlm-csp",
    summary="clustering (layers 0..a-1 on N_c representatives), scattering (a..b-1 on every image token), pruning "
    "(b.. on K by the last token's attention: the [SEG] position when the prompt ends with it)",
    reference="Chen et al., arXiv 2504.10854 (no public code: stage structure from the paper; layer boundaries, "
    "N_c and the re-admit rule are tpc's, see docs/methods.md)",
    priority=lambda signals, keep, params: signals.scores,
    transitions=_csp_transitions,
    params=(
        Param(
            "representatives",
            int,
            None,
            "N_c image tokens the clustering layers see (default: a quarter of the image tokens)",
            low=1,
        ),
        Param("sampler", str, "uniform", "how the representatives are chosen", choices=CSP_SAMPLERS),
        Param("seed", int, 0, "seed of the random sampler", low=0),
        Param(
            "cluster_end",
            int,
            None,
            "first scattering layer a: every image token is back (default 8 of 32, scaled)",
            "decoder",
        ),
        Param("prune_start", int, None, "first pruning layer b: K tokens stay (default 16 of 32, scaled)", "decoder"),
        Param(
            "readmit",
            str,
            "representative",
            "the state a non-representative re-enters with: its representative's update added to its embedding, or "
            "its layer-0 embedding",
            choices=CSP_READMIT,
        ),
    ),
    model_defaults=csp_default_layers,
    vision_guide=lambda params: CLS_ATTENTION if params["sampler"] == "cls-attention" else None,
)

REGISTRY: dict[str, Method] = {
    m.name: m for m in (HIPRUNE, DIVPRUNE, RANDOM, UNIFORM, FASTV, VLA_PRUNER, CATP, LVLM_CSP, NONE)
}
