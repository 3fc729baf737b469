"""A runtime's per-operator profile grouped into tpc's stages (`tpc.contract.names.STAGES`).

`tpc profile` times whole graphs; to say where the time goes, and what the calibrated ideal divides each stage's
FLOPs by (tpc.json `cost`), each timed node is put in the stage it belongs to. The runtime does not know; the
exporter recorded it: every node of an ONNX export carries the module path it ran in, those modules' classes and
the Python stack that made it (`tpc.runtimes.operators.GraphNode`). The rules, per component:

- `vision`, `model` (an encoder): modules of the vision tower -> `tower`, of the projector (LLaVA's
  `multi_modal_projector`, Qwen-VL's `merger`, OpenVLA's fused projector) -> `projector`; the operations of tpc's
  own pruned encoder that compute the method's priority or run the select op (`select_tokens`,
  `select_indices`, `gather_tokens` in the stack) -> `select`.
- `prefill` (and a policy step's prompt): the token embedding and the placement of the image tokens among the text
  (`place_images`) -> `embed`; decoder layers before the prune point -> `prefill_before`, from it on ->
  `prefill_after`; the final norm, the LM head and the last position's pick (`logits` in the stack) -> `lm_head`;
  the operations the scheduled decoder adds between layers around a TopK (priority, the select op, the gathers
  that drop tokens) -> `select`.
- `decode` (and a policy step's unrolled decode steps, `decode_static`/`decode_growing` in the stack): the
  embedding -> `embed`, final norm + LM head -> `lm_head`, everything else -> `decode`. This is how
  `tpc.kinds.base.decode_costs` splits a step's cost, so a stage's measured time and its FLOPs describe the same
  operators.
- taps (any component): a node inside an attention module (or computing attention in tpc's own tower) whose
  results feed only other tap nodes or the select stage: the work the attention taps add (a FastV row's
  logits and softmax, HiPrune's received-attention sums). The softmax a tap shares with the layer stays the
  layer's.

Nodes no rule names (rotary tables, a cache's padding, masks, tpc's own glue) take the stage of their consumers
when those agree, else of their producers (a node reading the token embedding and vision features: `embed`);
the rest is `other` (measured: no node of tiny-llava's vision, prefill or decode graphs, HiPrune or FastV, is
left there; tests/test_profile_operators.py bounds it at 2%).

The prune point is not recorded in tpc.json: it is read off the per-layer sequence lengths the export records
(a VLM's `generation.cache.lengths_after_prefill`, a policy's `decoder_lengths.pruned`) the way
`tpc.kinds.base.prune_layer` sets it from the schedule, the layer of the first transition: 0 when the first
layer already sees fewer tokens than the whole prompt (a vision-side method, a prune at layer 0) or no layer
differs (the unpruned baseline: all its layers are `prefill_after`), else the first layer whose length differs
from layer 0's. `stage_context(..., prune_layer=N)` overrides it.

An ETDump (`tpc.runtimes.executorch.etdump`) names kernels and delegate islands but no modules (mapping its debug
handles to modules needs an ETRecord, which tpc does not write), so its rows are grouped by component only:
`etdump_breakdown`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpc.contract.manifest import Manifest, inside
from tpc.contract.names import (
    DECODE,
    DECODE_STEP,
    EMBED,
    LM_HEAD,
    OTHER,
    PREFILL,
    PREFILL_AFTER,
    PREFILL_BEFORE,
    PROJECTOR,
    PRUNED,
    SELECT,
    SINGLE,
    STAGES,
    STEP,
    TAPS,
    TOWER,
    VISION,
    WARMUP,
)
from tpc.errors import UsageError
from tpc.runtimes.executorch.etdump import LOCAL_PROFILE_UNAVAILABLE, EtdumpReport
from tpc.runtimes.onnxruntime import graph_nodes, operator_profile
from tpc.runtimes.operators import GraphNode, OperatorEvent, SourceLine

COMPONENTS = (SINGLE, VISION, PREFILL, DECODE, WARMUP, PRUNED, STEP)
VISION_COMPONENTS = (SINGLE, VISION)  # graphs that are a vision tower (and its projector) only
DEFAULT_TOP = 10
# tpc's own wrappers (components, the pruned encoder, the policy step, Qwen's static tower): their operations are
# tpc's glue, classified by the stack and the data flow, not by the module
_TPC_WRAPPERS = "tpc.passes."
_LAYER = re.compile(
    r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(?:slice\((?P<start>None|\d+), [^)]*\)\.)?(?P<index>\d+)(?:\.|$)"
)
_PROJECTOR = re.compile(r"projector|merger|mm_proj")
_VISION = re.compile(r"vision|visual|featurizer|image_encoder")
_EMBEDDING = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in"}
_FINAL_NORM = {"norm", "final_layernorm", "final_norm", "ln_f", "norm_f"}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# what the stack says a tpc operation is (its innermost tpc frame's code)
_DECODE_CALLS = ("decode_growing(", "decode_static(")
_SOURCE_HINTS = (
    (".priority(", SELECT),
    ("select_tokens(", SELECT),
    ("select_indices(", SELECT),
    ("gather_tokens(", SELECT),
    ("place_images(", EMBED),
    (".logits(", LM_HEAD),
    ("final_hidden(", LM_HEAD),
)
_PLACEMENT_SOURCES = {EMBED, PROJECTOR, TOWER}  # what a node placing image features among text embeddings reads


@dataclass(frozen=True)
class StageContext:
    """What the stage of a node depends on besides the node: its component, and the first decoder layer of the
    pruned part of the prefill (`prefill_before` is layers 0 .. prune_layer - 1)."""

    component: str
    prune_layer: int = 0

    def layer_stage(self, layer: int) -> str:
        return PREFILL_BEFORE if layer < self.prune_layer else PREFILL_AFTER


def first_transition(lengths: Sequence[int], full: int) -> int:
    """The decoder layer where the image tokens first change, from each layer's sequence length and the whole
    prompt's (see the module docstring): what `tpc.kinds.base.prune_layer` reads off the schedule."""
    if not lengths or lengths[0] < full:
        return 0
    return next((layer for layer, length in enumerate(lengths) if length != lengths[0]), 0)


def stage_context(manifest: Manifest, component: str, prune_layer: int | None = None) -> StageContext:
    """The context of one component of an export (a staged policy's stage methods, `step_prefill`, name theirs).
    `prune_layer`: override the prune point read off the manifest."""
    known = [spec.name for spec in manifest.methods] + [c.name for c in manifest.components]
    if component not in known:
        raise UsageError(f"the export has no component '{component}' (it has: {', '.join(dict.fromkeys(known))})")
    if prune_layer is not None:
        if isinstance(prune_layer, bool) or not isinstance(prune_layer, int) or prune_layer < 0:
            raise UsageError(f"the prune layer must be a decoder layer index >= 0, got {prune_layer!r}")
        return StageContext(component, prune_layer)
    if manifest.generation is not None:
        generation = manifest.generation
        return StageContext(
            component, first_transition(generation.cache.lengths_after_prefill, generation.prompt.length)
        )
    if manifest.policy is not None and not component.startswith(WARMUP):  # the warm-up graph keeps every token
        lengths = manifest.policy.decoder_lengths
        return StageContext(component, first_transition(lengths.pruned, lengths.full[0] if lengths.full else 0))
    return StageContext(component)


def _segments(scope: str) -> list[str]:
    return scope.lower().split(".")


def _tpc_frame(source: Sequence[SourceLine]) -> SourceLine | None:
    """The innermost frame of tpc's own code: the most specific thing the stack says about a tpc operation."""
    return next((frame for frame in reversed(source) if "/tpc/" in frame.file.replace("\\", "/")), None)


def in_decode(node: GraphNode, context: StageContext) -> bool:
    """A decode step's node: the decode component, or a step graph's unrolled decode."""
    if context.component == DECODE or context.component.endswith("_" + DECODE):
        return True
    return any(call in frame.code for frame in node.source if "/tpc/" in frame.file for call in _DECODE_CALLS)


def _model_scope(node: GraphNode) -> str | None:
    """The innermost module path of the model itself (not one of tpc's wrappers), or None."""
    for scope, cls in zip(reversed(node.scopes), reversed(node.classes), strict=True):
        if not cls.startswith(_TPC_WRAPPERS):
            return scope
    return None


def _layer(scope: str) -> int | None:
    match = _LAYER.search(scope)
    if match is None:
        return None
    start = match["start"]
    return (0 if start in (None, "None") else int(start)) + int(match["index"])


def node_stage(node: GraphNode, context: StageContext) -> str | None:
    """The stage one node's own facts name (module path, classes, stack, op type); None when only the data flow
    can tell (a rotary table, a mask, tpc's glue between modules). Also what an ETDump row gets (no scope)."""
    decode = in_decode(node, context)
    scope = _model_scope(node)
    if scope is None:  # tpc's own operations: what the stack says, else the select op's TopK
        frame = _tpc_frame(node.source)
        hint = next((stage for needle, stage in _SOURCE_HINTS if frame is not None and needle in frame.code), None)
        if decode:  # a step's positions and masks (an ETDump row of a decode method: all of it)
            return hint if hint in (EMBED, LM_HEAD) else DECODE_STEP
        if hint is None and "topk" in node.op_type.lower():
            return SELECT
        return hint
    segments = _segments(scope)
    if any(_PROJECTOR.search(segment) for segment in segments):
        return PROJECTOR
    if context.component in VISION_COMPONENTS or any(_VISION.search(segment) for segment in segments):
        return TOWER
    if any(segment in _EMBEDDING for segment in segments):
        return EMBED
    if "lm_head" in segments or (segments[-1] in _FINAL_NORM and _layer(scope) is None):
        return LM_HEAD
    if any("rotary" in segment for segment in segments):
        return None  # a table every layer after it reads: its consumers' stage
    layer = _layer(scope)
    if layer is not None:
        return DECODE_STEP if decode else context.layer_stage(layer)
    return None


def _attention(node: GraphNode) -> bool:
    frame = _tpc_frame(node.source)
    return bool(_ATTENTION.search(node.scope)) or (frame is not None and "attention" in frame.code)


def node_stages(nodes: Sequence[GraphNode], context: StageContext) -> dict[str, str]:
    """Every node's stage (node name -> one of STAGES), `nodes` in graph (topological) order: `node_stage`, then the
    data flow: TopK-connected glue is `select`, tap-only attention nodes `taps`, the rest inherits (module
    docstring)."""
    if context.component not in COMPONENTS and "_" not in context.component:
        raise UsageError(f"unknown component '{context.component}'; valid: {', '.join(COMPONENTS)}")
    stages: dict[str, str | None] = {node.name: node_stage(node, context) for node in nodes}
    producer: dict[str, str] = {out: node.name for node in nodes for out in node.outputs if out}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        for tensor in node.inputs:
            if tensor in producer:
                consumers[producer[tensor]].append(node.name)
    producers = {node.name: [producer[t] for t in node.inputs if t in producer] for node in nodes}
    graph_outputs = _graph_outputs(nodes, consumers)
    _select_regions(nodes, stages, consumers, producers, context)
    _taps(nodes, stages, consumers, graph_outputs, context)
    _inherit(nodes, stages, consumers, producers)
    return {name: stage if stage is not None else OTHER for name, stage in stages.items()}


def _graph_outputs(nodes: Sequence[GraphNode], consumers: Mapping[str, list[str]]) -> set[str]:
    """Nodes with an output no node reads: a graph output (the data flow cannot call them tap-only)."""
    read = {tensor for node in nodes for tensor in node.inputs}
    return {node.name for node in nodes if any(out and out not in read for out in node.outputs)}


def _select_regions(
    nodes: Sequence[GraphNode],
    stages: dict[str, str | None],
    consumers: Mapping[str, list[str]],
    producers: Mapping[str, list[str]],
    context: StageContext,
) -> None:
    """tpc's unclassified glue connected (through other such glue) to tpc's `select` operations (the select op's
    TopK, a priority): the scheduled decoder's priority, select op and token gathers, whose stack names only
    `decoder.prefill(...)`, and what reads a tap's value for a priority."""
    glue = {
        node.name
        for node in nodes
        if stages[node.name] is None and _model_scope(node) is None and not in_decode(node, context)
    }
    seeds = [node.name for node in nodes if stages[node.name] == SELECT and _model_scope(node) is None]
    scope = {node.name: node.scope for node in nodes}
    seen: set[str] = set()
    frontier = list(seeds)
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in glue:
            stages[name] = SELECT
        # within the seed's own module only: a wrapper's attention (Qwen's tower) is not the select
        frontier += [
            other
            for other in (*consumers.get(name, ()), *producers[name])
            if other in glue and scope[other] == scope[name]
        ]


def _taps(
    nodes: Sequence[GraphNode],
    stages: dict[str, str | None],
    consumers: Mapping[str, list[str]],
    graph_outputs: set[str],
    context: StageContext,
) -> None:
    """Attention nodes whose every consumer is a tap or the select stage, latest first (consumers first)."""
    for node in reversed(nodes):
        if stages[node.name] not in (TOWER, PREFILL_BEFORE, PREFILL_AFTER, None) or node.name in graph_outputs:
            continue
        if not _attention(node) or in_decode(node, context):
            continue
        readers = consumers.get(node.name, [])
        if readers and all(stages[reader] in (TAPS, SELECT) for reader in readers):
            stages[node.name] = TAPS


def _agreed(names: Iterable[str], stages: Mapping[str, str | None], complete: bool) -> str | None:
    found = [stages[name] for name in names]
    decided = {stage for stage in found if stage is not None}
    if not found or len(decided) != 1 or (complete and None in found):
        return None
    return decided.pop()


def _placement(names: Iterable[str], stages: Mapping[str, str | None], complete: bool) -> str | None:
    """`embed` for a node reading the token embedding and vision features only (placing the image tokens)."""
    found = [stages[name] for name in names]
    decided = {stage for stage in found if stage is not None}
    if EMBED not in decided or not decided <= _PLACEMENT_SOURCES or (complete and None in found):
        return None
    return EMBED


def _inherit(
    nodes: Sequence[GraphNode],
    stages: dict[str, str | None],
    consumers: Mapping[str, list[str]],
    producers: Mapping[str, list[str]],
) -> None:
    """Unclassified nodes take their consumers' stage, else their producers' (reading the token embedding with
    vision features: `embed`); first where all of them are classified, then where those that are agree. A rule
    applies only when no earlier one can: a rotary table whose positions come from the select takes the layers'
    stage, not the select's."""
    forward, backward = list(nodes), list(reversed(nodes))
    rules = [
        (forward, lambda name, complete: _placement(producers[name], stages, complete)),
        (backward, lambda name, complete: _agreed(consumers.get(name, []), stages, complete)),
        (forward, lambda name, complete: _agreed(producers[name], stages, complete)),
    ]
    for complete in (True, False):
        progress = True
        while progress:
            progress = False
            for order, rule in rules:
                for node in order:
                    if stages[node.name] is None and (stage := rule(node.name, complete)) is not None:
                        stages[node.name] = stage
                        progress = True
                if progress:
                    break


@dataclass(frozen=True)
class StageTotal:
    """One stage of one component: mean ms per call of the component, share of its operator time, operators."""

    stage: str
    ms: float
    share: float
    operators: int


@dataclass(frozen=True)
class TopOperator:
    """One of a component's slowest operators: mean ms per call of the component, share of its operator time."""

    name: str
    op_type: str
    stage: str
    ms: float
    share: float
    scope: str = ""


@dataclass(frozen=True)
class StageBreakdown:
    """A component's operator time by stage (STAGES order, stages with operators only) and its slowest operators.

    `attribution`: "scopes" (each node by its recorded module scope, the ONNX export's) or "component" (an
    ETDump's rows: no scopes; only a decode method's and the select op's TopK kernels are told apart)."""

    component: str
    runs: int
    total_ms: float  # mean operator time per call, summed over the stages
    stages: tuple[StageTotal, ...]
    top: tuple[TopOperator, ...]
    attribution: str = "scopes"

    def share(self, stage: str) -> float:
        return next((row.share for row in self.stages if row.stage == stage), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _breakdown(
    component: str,
    rows: Sequence[tuple[str, str, str, str, float]],
    runs: int,
    top: int,
    attribution: str,
) -> StageBreakdown:
    """rows: (name, op type, stage, scope, total ms over the runs)."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise UsageError(f"a stage breakdown needs the number of timed runs (>= 1), got {runs!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise UsageError(f"the number of top operators must be >= 0, got {top!r}")
    total = sum(row[4] for row in rows)
    share = (lambda ms: ms / total) if total > 0 else (lambda ms: 0.0)
    per_stage: dict[str, list[float]] = defaultdict(list)
    for _, _, stage, _, ms in rows:
        per_stage[stage].append(ms)
    stages = tuple(
        StageTotal(stage, sum(per_stage[stage]) / runs, share(sum(per_stage[stage])), len(per_stage[stage]))
        for stage in STAGES
        if stage in per_stage
    )
    slowest = sorted(rows, key=lambda row: row[4], reverse=True)[:top]
    tops = tuple(TopOperator(name, op, stage, ms / runs, share(ms), scope) for name, op, stage, scope, ms in slowest)
    return StageBreakdown(component, runs, total / runs, stages, tops, attribution)


def stage_breakdown(
    events: Sequence[OperatorEvent],
    stages: Mapping[str, str],
    component: str,
    runs: int,
    top: int = DEFAULT_TOP,
) -> StageBreakdown:
    """Group one component's operator events (`tpc.runtimes.onnxruntime.operator_profile` over `runs` timed runs)
    by the stages `node_stages` gave their exported nodes; an event that maps to no exported node is `other`."""
    rows = [
        (
            event.node,
            event.op_type,
            stages.get(event.origin, OTHER) if event.origin is not None else OTHER,
            event.scope,
            event.total_ms,
        )
        for event in events
    ]
    return _breakdown(component, rows, runs, top, "scopes")


def etdump_breakdown(report: EtdumpReport, top: int = DEFAULT_TOP) -> StageBreakdown:
    """An ETDump's operator table grouped by component only (no module scopes without an ETRecord): a decode
    method's rows are `decode`; elsewhere the select op's TopK kernels (portable: XNNPACK has none) are `select`
    and every other row (a delegate island mixes a tower's layers with its projector) is `other`. A backend's own
    events inside a delegate (kind "other") are already inside their island's time and are left out."""
    context = StageContext(report.method)
    rows = []
    for row in report.operators:
        if row.kind == "other":
            continue
        stage = node_stage(GraphNode(row.name, row.name), context) or OTHER
        rows.append((row.name, row.kind, stage, "", row.total_ms))
    return _breakdown(report.method, rows, max(report.runs, 1), top, "component")


def operator_stages(
    nodes: Sequence[GraphNode], manifest: Manifest, component: str, prune_layer: int | None = None
) -> dict[str, str]:
    """`node_stages` of one component of an export, its context read off the manifest."""
    return node_stages(nodes, stage_context(manifest, component, prune_layer))


def operators_unavailable(runtime: str) -> str | None:
    """Why an export run by `runtime` gets no per-operator breakdown here (None: it does, ONNX Runtime's)."""
    if runtime == "onnxruntime":
        return None
    if runtime == "executorch":
        return LOCAL_PROFILE_UNAVAILABLE
    return f"tpc reads no per-operator profile from {runtime} (only ONNX Runtime's, and a device's ETDump)"


def onnx_breakdown(
    directory: Path,
    manifest: Manifest,
    component: str,
    inputs: dict[str, np.ndarray],
    runs: int,
    warmup: int,
    top: int = DEFAULT_TOP,
    prune_layer: int | None = None,
) -> StageBreakdown:
    """One component of an ONNX Runtime export profiled per operator (`runs` timed calls after `warmup`) and
    grouped into stages: the whole pipeline in one call."""
    reason = operators_unavailable(manifest.runtime or "onnxruntime")
    if reason is not None:
        raise UsageError(f"'{directory}' is not run by ONNX Runtime: {reason}")
    spec = manifest.component(component) if component in [c.name for c in manifest.components] else None
    if spec is None:
        raise UsageError(
            f"the export has no component '{component}' (it has: {', '.join(c.name for c in manifest.components)})"
        )
    artifact = inside(Path(directory), spec.artifact, "artifact")
    nodes = graph_nodes(artifact)  # read once: the stages and the profile's node mapping both need them
    stages = operator_stages(nodes, manifest, component, prune_layer)
    return stage_breakdown(operator_profile(artifact, inputs, runs, warmup, nodes), stages, component, runs, top)
