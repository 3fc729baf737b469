"""The per-operator profile of an export, grouped into tpc's stages (tpc.runtimes.onnxruntime.operator_profile,
tpc.profiling.stages).

Two tiny-llava exports (the session's `exported`, shared with the other test files): HiPrune prunes in the vision
graph (its tower carries two attention taps and the select op), FastV in the prefill after decoder layer 1 (a
tap on layer 1's last row). What must hold: every kernel ONNX Runtime ran is in the profile, once per timed run,
and maps back to an exported node; each graph's stages are the ones its method implies, with the tap's extra
softmax told apart from the layer's own; the shares add up and `other` stays under `MAX_OTHER`.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tpc.contract.manifest import Manifest, read_samples
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
    SELECT,
    STAGES,
    TAPS,
    TOWER,
    VISION,
)
from tpc.errors import UsageError
from tpc.profiling.stages import (
    StageContext,
    etdump_breakdown,
    first_transition,
    node_stages,
    onnx_breakdown,
    operator_stages,
    operators_unavailable,
    stage_breakdown,
    stage_context,
)
from tpc.runtimes.executorch.etdump import LOCAL_PROFILE_UNAVAILABLE, EtdumpReport, OperatorTime
from tpc.runtimes.onnxruntime import graph_nodes, kernel_events, operator_profile
from tpc.runtimes.operators import GraphNode, OperatorEvent, origin_of

RUNS, WARMUP = 3, 1
MAX_OTHER = 0.02  # measured: 0 nodes of any tiny-llava component fall outside a stage


@pytest.fixture(scope="module")
def hiprune(exported: Callable[..., Path]) -> Path:
    return exported("zoo:tiny-llava", "hiprune", 64)


@pytest.fixture(scope="module")
def fastv(exported: Callable[..., Path]) -> Path:
    return exported("zoo:tiny-llava", "fastv", 64)


def _stages(directory: Path, component: str) -> tuple[list[GraphNode], dict[str, str]]:
    manifest = Manifest.read(directory)
    nodes = graph_nodes(directory / manifest.component(component).artifact)
    return nodes, operator_stages(nodes, manifest, component)


def _inputs(directory: Path, component: str) -> dict[str, np.ndarray]:
    return read_samples(directory, component, "inputs.npz")


def test_every_kernel_that_ran_is_profiled_once_per_timed_run(
    hiprune: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    import onnxruntime as ort

    scratch = tmp_path / "scratch"  # where the profiler's trace goes, and must be gone from
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for component in (VISION, PREFILL, DECODE):
        artifact = hiprune / f"{component}.onnx"
        options = ort.SessionOptions()  # the graph ONNX Runtime executes: the same optimisation, saved
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / f"{component}.optimized.onnx")
        ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        executed = {node.name for node in onnx.load(options.optimized_model_filepath).graph.node}
        events = operator_profile(artifact, _inputs(hiprune, component), RUNS, WARMUP)
        assert {event.node for event in events} == executed, component
        assert all(event.calls == RUNS and event.total_ms >= 0 for event in events)
        exported_nodes = {node.name: node for node in graph_nodes(artifact)}
        assert all(event.origin in exported_nodes for event in events), [e.node for e in events if e.origin is None]
        for event in events:  # a node the optimiser kept runs under its own name and carries its own scope
            if event.node in exported_nodes:
                assert event.origin == event.node and event.scope == exported_nodes[event.node].scope
    assert not list(scratch.iterdir()), "the profiler's trace was not deleted"


def test_the_exporters_scopes_name_the_modules(hiprune: Path) -> None:
    nodes = {node.name: node for node in graph_nodes(hiprune / "vision.onnx")}
    scopes = {node.scope for node in nodes.values()}
    assert "tower.model.embeddings.patch_embedding" in scopes and "projector.linear_1" in scopes
    tapped = [node for node in nodes.values() if node.op_type == "ReduceSum"]  # HiPrune's received-attention sums
    assert tapped and all(node.scope.endswith("self_attn") for node in tapped)
    topk = [node for node in nodes.values() if node.op_type == "TopK"]
    assert topk and all(node.scope == "tower" and node.source for node in topk)  # tpc's pruned encoder itself
    assert any(".priority(" in frame.code for node in topk for frame in node.source)


def test_vision_side_hiprune_stages(hiprune: Path) -> None:
    nodes, stages = _stages(hiprune, VISION)
    counts = Counter(stages.values())
    assert {TOWER, TAPS, SELECT, PROJECTOR} <= counts.keys() and counts[OTHER] <= MAX_OTHER * len(nodes)
    taps = [node for node in nodes if stages[node.name] == TAPS]
    # object_layer 2 and deep_layer 3 tap the attention of encoder layers 1 and 2 (0-based), and only those
    assert {node.scope.split(".")[-2] for node in taps} == {"1", "2"}
    assert all(stages[node.name] == SELECT for node in nodes if node.op_type == "TopK")
    softmax = [node for node in nodes if node.op_type == "Softmax"]
    assert softmax and all(stages[node.name] == TOWER for node in softmax)  # the tap shares the layer's softmax
    prefill_nodes, prefill = _stages(hiprune, PREFILL)
    assert set(prefill.values()) == {EMBED, PREFILL_AFTER, LM_HEAD}  # pruned before the decoder: all `after`
    lm_head = {node.scope for node in prefill_nodes if prefill[node.name] == LM_HEAD}
    assert {"decoder.model.lm_head", "decoder.model.model.language_model.norm"} <= lm_head
    decode_nodes, decode = _stages(hiprune, DECODE)
    assert set(decode.values()) == {EMBED, DECODE_STEP, LM_HEAD}
    assert Counter(decode.values())[DECODE_STEP] > 0.9 * len(decode_nodes)


def test_fastv_prefill_splits_at_its_prune_layer_and_tells_its_tap_from_the_layer(fastv: Path) -> None:
    manifest = Manifest.read(fastv)
    assert (
        stage_context(manifest, PREFILL) == StageContext(PREFILL, manifest.params["layer"]) == StageContext(PREFILL, 2)
    )
    nodes, stages = _stages(fastv, PREFILL)
    layer_stage = {}
    for node in nodes:
        if ".layers." in node.scope and stages[node.name] in (PREFILL_BEFORE, PREFILL_AFTER):
            layer_stage.setdefault(int(node.scope.split(".layers.")[1].split(".")[0]), set()).add(stages[node.name])
    assert layer_stage == {0: {PREFILL_BEFORE}, 1: {PREFILL_BEFORE}, 2: {PREFILL_AFTER}, 3: {PREFILL_AFTER}}
    # layer 1 runs two softmaxes: SDPA's over every row, and the tap's over the last row only
    layer1 = [node for node in nodes if node.op_type == "Softmax" and ".layers.1." in node.scope + "."]
    assert sorted(stages[node.name] for node in layer1) == sorted([PREFILL_BEFORE, TAPS])
    assert {stages[node.name] for node in nodes if node.op_type == "TopK"} == {SELECT}
    assert Counter(stages.values())[OTHER] <= MAX_OTHER * len(nodes)


def test_stage_shares_sum_to_one_and_other_is_small(hiprune: Path, fastv: Path) -> None:
    expected = {
        (hiprune, VISION): {TOWER, TAPS, SELECT, PROJECTOR},
        (hiprune, PREFILL): {EMBED, PREFILL_AFTER, LM_HEAD},
        (hiprune, DECODE): {EMBED, DECODE_STEP, LM_HEAD},
        (fastv, PREFILL): {EMBED, TAPS, SELECT, PREFILL_BEFORE, PREFILL_AFTER, LM_HEAD},
    }
    for (directory, component), stages in expected.items():
        manifest = Manifest.read(directory)
        breakdown = onnx_breakdown(directory, manifest, component, _inputs(directory, component), RUNS, WARMUP, top=5)
        assert {row.stage for row in breakdown.stages} - {OTHER} == stages, (directory.parent.name, component)
        assert [row.stage for row in breakdown.stages] == [
            s for s in STAGES if s in {r.stage for r in breakdown.stages}
        ]
        assert sum(row.share for row in breakdown.stages) == pytest.approx(1.0)
        assert sum(row.ms for row in breakdown.stages) == pytest.approx(breakdown.total_ms)
        assert breakdown.share(OTHER) < MAX_OTHER
        assert len(breakdown.top) == 5 and [t.ms for t in breakdown.top] == sorted(
            (t.ms for t in breakdown.top), reverse=True
        )
        assert breakdown.runs == RUNS and breakdown.to_dict()["attribution"] == "scopes"


def test_the_prune_point_is_read_off_the_per_layer_lengths() -> None:
    assert first_transition((303, 303, 111, 111), 303) == 2  # FastV at layer 2
    assert first_transition((111, 111, 111, 111), 303) == 0  # pruned in the vision graph
    assert first_transition((303, 303, 303, 303), 303) == 0  # the unpruned baseline: every layer `after`
    assert first_transition((80, 80, 303, 303, 40), 303) == 0  # a prune at layer 0, a re-admit, a prune
    assert first_transition((), 303) == 0
    assert StageContext(PREFILL, 2).layer_stage(1) == PREFILL_BEFORE
    assert StageContext(PREFILL, 2).layer_stage(2) == PREFILL_AFTER


def test_warmup_runs_are_not_counted() -> None:
    """A synthetic trace: the warm-up run's kernel is ten times slower and must not count."""
    node = GraphNode("node_a", "MatMul", ("layers.0",), ("x.Layer",))

    def run(start: int, dur: int) -> list[dict]:
        return [
            {"cat": "Session", "name": "model_run", "ts": start, "dur": 100},
            {"cat": "Node", "name": "node_a_kernel_time", "ts": start + 1, "dur": dur, "args": {"op_name": "MatMul"}},
            {"cat": "Node", "name": "node_a_fence_before", "ts": start + 1, "dur": 5, "args": {}},
        ]

    trace = run(0, 90) + run(1000, 9) + run(2000, 9)
    (event,) = kernel_events(trace, 1, {"node_a": node})
    assert event == OperatorEvent("node_a", "MatMul", "node_a", "layers.0", 0.018, 2)


def test_fused_nodes_map_back_to_the_node_they_are_named_after() -> None:
    known = {"node_MatMul_159", "node_Reshape_903", "node_slice_4"}
    assert origin_of("node_MatMul_159/MatMulScaleFusion//MatmulTransposeFusion/", known) == "node_MatMul_159"
    assert origin_of("node_Reshape_903_new_reshape", known) == "node_Reshape_903"
    assert origin_of("node_slice_4/GatherSliceToSplitFusion", known) == "node_slice_4"
    assert origin_of("gemm_input_reshape_token_8", known) is None
    events = [OperatorEvent("SkipLayerNormalization", "SkipLayerNormalization", None, "", 1.0, 1)]
    breakdown = stage_breakdown(events, {}, VISION, 1)
    assert breakdown.share(OTHER) == 1.0


def test_an_etdump_groups_by_component_only() -> None:
    rows = [
        OperatorTime("aten::topk.values", "portable", 2, 2.0, 1.0, 0.2),
        OperatorTime("XnnpackBackend island 0", "delegate", 1, 8.0, 8.0, 0.8),
        OperatorTime("Fully Connected (NC, F32) GEMM", "other", 4, 6.0, 1.5, 0.6),  # inside the island
    ]
    vision = etdump_breakdown(EtdumpReport("v.etdump", "dir", VISION, rows, [5.0, 5.0]))
    assert {row.stage: row.ms for row in vision.stages} == {SELECT: 1.0, OTHER: 4.0}
    assert vision.attribution == "component" and vision.total_ms == pytest.approx(5.0)
    decode = etdump_breakdown(EtdumpReport("d.etdump", "dir", DECODE, rows, [10.0]))
    assert [(row.stage, row.share) for row in decode.stages] == [(DECODE_STEP, 1.0)]
    staged = etdump_breakdown(EtdumpReport("s.etdump", "dir", "step_decode", rows, [10.0]))
    assert [row.stage for row in staged.stages] == [DECODE_STEP]
    assert operators_unavailable("executorch") == LOCAL_PROFILE_UNAVAILABLE and "ETDump" in LOCAL_PROFILE_UNAVAILABLE
    assert operators_unavailable("onnxruntime") is None and operators_unavailable("coreml")


def test_bad_input_is_one_usage_error_line(hiprune: Path) -> None:
    artifact, inputs = hiprune / "vision.onnx", _inputs(hiprune, VISION)
    manifest = Manifest.read(hiprune)
    for call, words in [
        (lambda: operator_profile(artifact, inputs, 0, 1), "at least one timed run"),
        (lambda: operator_profile(artifact, inputs, 1, -1), "warm-up"),
        (lambda: operator_profile(artifact, {"pixel": inputs["pixel_values"]}, 1, 0), "missing pixel_values"),
        (lambda: operator_profile(artifact, {"pixel_values": inputs["pixel_values"][..., :3]}, 1, 0), "did not run"),
        (lambda: operator_profile(hiprune / "nope.onnx", inputs, 1, 0), "nope.onnx"),
        (lambda: stage_context(manifest, "step"), "no component 'step'"),
        (lambda: stage_context(manifest, PREFILL, prune_layer=-1), "prune layer"),
        (lambda: node_stages([], StageContext("tower")), "unknown component"),
        (lambda: stage_breakdown([], {}, VISION, 0), "timed runs"),
    ]:
        with pytest.raises(UsageError) as error:
            call()
        assert words in str(error.value) and "\n" not in str(error.value)
