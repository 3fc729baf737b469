"""The per-stage cost model (tpc.json `cost`), the ideal speedups computed from it, and the fixed call overhead.

The stage costs are the one FLOPs computation `tpc inspect` reports from, so their sums are checked against the
formulas it used before they were split into stages (the decoder layout's own `flops`, the towers' and mergers'),
and against what `describe` says. The ideals are pure functions: their properties hold for any costs and times.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpc.contract.cost import StageCost, flops_by_component, total_flops
from tpc.contract.manifest import Manifest
from tpc.contract.names import (
    DECODE,
    LM_HEAD,
    MANIFEST_FILE,
    PREFILL,
    PREFILL_AFTER,
    PREFILL_BEFORE,
    PROJECTOR,
    PRUNED,
    SELECT,
    STAGES,
    STEP,
    TAPS,
    TOWER,
    VISION,
    WARMUP,
)
from tpc.errors import UsageError
from tpc.inspect import describe
from tpc.kinds.base import CostScale
from tpc.pipeline import PruneRequest, kind_for, plan
from tpc.profiling.ideal import (
    COMPONENTS,
    OPERATORS,
    Headline,
    MeasuredTime,
    ideal_speedups,
    per_component,
    unavailable,
)
from tpc.profiling.overhead import call_overhead, empty_graph
from tpc.runtimes.onnxruntime import onnx_io


def costs_of(model: str, method: str, keep: int | None, params: dict | None = None, batch: int = 1):
    the_plan = plan(PruneRequest(model, method, keep, params or {}, "fp32", batch))
    return the_plan, kind_for(the_plan.source).stage_costs(the_plan)


# --- the cost model: sums equal inspect's totals --------------------------------------------------------------


def test_encoder_stages_sum_to_the_exported_graph() -> None:
    the_plan, costs = costs_of("zoo:clip-vit-l-336", "hiprune", 64)
    geometry = the_plan.source.geometry
    assert [c.stage for c in costs] == [TOWER, TAPS, SELECT]
    assert total_flops(costs) == the_plan.depth * geometry.layer_flops(geometry.sequence_length)
    assert total_flops(costs) == describe(PruneRequest("zoo:clip-vit-l-336", "hiprune", 64))["flops"]["pruned_graph"]
    assert all(c.floor_flops == c.flops for c in costs)  # the tower runs on every patch, pruned or not


def layout_flops(layout, decoder, decode_tokens: int = 1) -> tuple[int, int]:
    """(prefill, decode) FLOPs of a decoder layout as computed before they were split into stages: every layer at
    its own length (causal: half the prompt as context on average), `decode_tokens` steps after it."""
    lengths = layout.kept_lengths
    prefill = decoder.head_flops(1) + sum(decoder.layer_flops(n, (n + 1) // 2) for n in lengths)
    decode = sum(
        decoder.head_flops(1) + sum(decoder.layer_flops(1, n + step) for n in lengths)
        for step in range(1, decode_tokens + 1)
    )
    return prefill, decode


def llava_reference(the_plan) -> dict[str, int]:
    """The VLM's FLOPs as computed before they were split into stages."""
    geometry, decoder, cache, config = (
        the_plan.source.geometry,
        the_plan.decoder,
        the_plan.cache,
        the_plan.source.config,
    )
    prefill, decode = layout_flops(cache, decoder)
    projector_in = geometry.hidden_size * len(the_plan.adapter.feature_layers(config))
    projector = 2 * cache.image_tokens * (projector_in * decoder.hidden_size + decoder.hidden_size**2)
    tower = the_plan.prompt.images * the_plan.cut.depth * geometry.layer_flops(geometry.sequence_length)
    return {"tower": tower, "projector": projector, "prefill": prefill, "decode_token": decode}


@pytest.mark.parametrize(
    ("method", "keep", "params"),
    [("hiprune", 64, {}), ("fastv", 64, {}), ("none", None, {}), ("catp", 64, {"shots": "2"})],
)
def test_llava_stages_sum_to_inspects_totals(method: str, keep: int | None, params: dict) -> None:
    the_plan, costs = costs_of("zoo:tiny-llava", method, keep, params)
    per_component = flops_by_component(costs)
    want = llava_reference(the_plan)
    images = the_plan.prompt.images
    assert images * per_component[VISION] == want["tower"] + want["projector"]
    assert per_component[PREFILL] == want["prefill"] and per_component[DECODE] == want["decode_token"]
    assert the_plan.flops() == want
    shown = describe(PruneRequest("zoo:tiny-llava", method, keep, params))["flops"]["pruned"]
    assert shown == want
    stages = {(c.component, c.stage): c for c in costs}
    assert (PREFILL, LM_HEAD) in stages and (DECODE, DECODE) in stages
    if method == "fastv":  # prunes inside the decoder: the layers before its layer see every token
        before, after = stages[PREFILL, PREFILL_BEFORE], stages[PREFILL, PREFILL_AFTER]
        layer = the_plan.schedule.prunes[0].layer
        n = the_plan.cache.kept_lengths[0]
        assert before.flops == layer * the_plan.decoder.layer_flops(n, (n + 1) // 2) > 0
        assert after.flops < before.flops and (PREFILL, SELECT) in stages and (PREFILL, TAPS) in stages
    else:  # vision side (or nothing pruned): every decoder layer is after the prune point
        assert (PREFILL, PREFILL_BEFORE) not in stages
    if method == "hiprune":
        assert (VISION, SELECT) in stages and (VISION, TAPS) in stages
    assert all(c.stage in STAGES and 0 <= c.floor_flops <= c.flops and c.bytes > 0 for c in costs)


@pytest.mark.parametrize(("model", "method"), [("zoo:tiny-qwen25vl", "hiprune"), ("zoo:tiny-qwen3vl", "fastv")])
def test_qwen_stages_sum_to_inspects_totals(model: str, method: str) -> None:
    the_plan, costs = costs_of(model, method, 16)
    config, qwen = the_plan.source.config, the_plan.qwen
    prefill, decode = layout_flops(the_plan.cache, the_plan.decoder)
    per_component = flops_by_component(costs)
    assert per_component[VISION] == qwen.tower_flops(config) + qwen.merger_flops(config)
    assert per_component[PREFILL] == prefill and per_component[DECODE] == decode
    assert describe(PruneRequest(model, method, 16))["flops"]["pruned"] == the_plan.flops()
    merger = next(c for c in costs if c.component == VISION and c.stage == PROJECTOR)
    assert merger.floor_flops == merger.flops  # the merger runs on every merged token, before the selection


@pytest.mark.parametrize(("method", "components"), [("fastv", (STEP,)), ("vla-pruner", (WARMUP, PRUNED))])
def test_policy_stages_sum_to_inspects_totals(method: str, components: tuple[str, ...]) -> None:
    the_plan, costs = costs_of("zoo:tiny-openvla", method, 64)
    geometry, decoder = the_plan.geometry, the_plan.decoder
    per_component = flops_by_component(costs)
    assert tuple(per_component) == components
    for name in components:
        pruned = name != WARMUP
        prefill, decode = layout_flops(the_plan.layout(pruned), decoder, geometry.action_dim - 1)
        vision = sum(spec.hidden_size for spec in geometry.towers)
        d, n = decoder.hidden_size, geometry.image_tokens
        projector = 2 * n * (vision * 4 * vision + 4 * vision * d + d * d)
        assert per_component[name] == geometry.tower_flops() + projector + prefill + decode
        assert per_component[name] == the_plan.flops(pruned)["step"]
    assert (
        describe(PruneRequest("zoo:tiny-openvla", method, 64))["flops"]["pruned"]["step"]
        == per_component[components[-1]]
    )


def test_batch_scales_flops_and_activations_not_weights() -> None:
    _, one = costs_of("zoo:tiny-llava", "hiprune", 64)
    _, two = costs_of("zoo:tiny-llava", "hiprune", 64, batch=2)
    for a, b in zip(one, two, strict=True):
        assert (b.flops == 2 * a.flops and a.bytes <= b.bytes < 2 * a.bytes) or a.flops == 0
    assert (
        2 * CostScale(1, 2).cost(VISION, TOWER, 10, 100, 5).bytes == CostScale().cost(VISION, TOWER, 10, 100, 5).bytes
    )


def test_stage_cost_refuses_what_the_model_cannot_mean() -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        StageCost(VISION, "warp", 1, 1)
    with pytest.raises(ValueError, match="floor_flops"):
        StageCost(VISION, TOWER, 1, 1, floor_flops=2)
    cost = StageCost(PREFILL, PREFILL_AFTER, 10, 20, 5)
    assert StageCost.from_dict(cost.to_dict()) == cost


# --- recorded at export, read back, and absent from older exports ---------------------------------------------


@pytest.fixture(scope="module")
def llava_export(exported: Callable[..., Path]) -> Path:
    return exported("zoo:tiny-llava", "hiprune", 64)


def test_the_cost_is_recorded_in_tpc_json(llava_export: Path) -> None:
    manifest = Manifest.read(llava_export)
    _, want = costs_of("zoo:tiny-llava", "hiprune", 64)
    assert manifest.cost == want
    recorded = json.loads((llava_export / MANIFEST_FILE).read_text())["cost"]
    assert recorded == [cost.to_dict() for cost in want]
    assert {c.component for c in manifest.cost} == {spec.name for spec in manifest.components}


def rewritten(export: Path, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    change(data)
    (copy / MANIFEST_FILE).write_text(json.dumps(data))
    return copy


def test_an_export_written_before_the_cost_still_reads(llava_export: Path, tmp_path: Path) -> None:
    older = rewritten(llava_export, tmp_path, lambda data: data.pop("cost"))
    manifest = Manifest.read(older)
    assert manifest.cost is None
    assert "re-export" in (unavailable(manifest.cost, Manifest.read(llava_export).cost) or "")
    assert unavailable(Manifest.read(llava_export).cost, Manifest.read(llava_export).cost) is None


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda data: data["cost"][0].update(stage="warp"), "cost[0].stage"),
        (lambda data: data["cost"][1].update(flops=-1), "cost[1].flops"),
        (lambda data: data["cost"][0].update(extra=1), "cost[0]"),
    ],
)
def test_a_malformed_cost_is_one_line(llava_export: Path, tmp_path: Path, change, where: str) -> None:
    with pytest.raises(UsageError, match="not a valid tpc manifest: " + re.escape(where)):
        Manifest.read(rewritten(llava_export, tmp_path, change))


# --- the fixed call overhead ----------------------------------------------------------------------------------


def test_the_empty_graph_has_the_components_io_and_runs(llava_export: Path, tmp_path: Path) -> None:
    import onnx

    manifest = Manifest.read(llava_export)
    for spec in manifest.components:
        path = tmp_path / f"{spec.name}.onnx"
        onnx.save(empty_graph(spec), str(path))
        inputs, outputs = onnx_io(path)
        assert inputs == {t.name: (t.shape, t.dtype) for t in spec.inputs}
        assert outputs == {t.name: (t.shape, t.dtype) for t in spec.outputs}
        overhead = call_overhead(spec, "onnxruntime", calls=5, warmup=1)
        assert overhead.ms is not None and overhead.ms > 0 and overhead.reason is None
    refused = call_overhead(manifest.components[0], "executorch")
    assert refused.ms is None and "onnxruntime only" in (refused.reason or "")


# --- the ideals -----------------------------------------------------------------------------------------------

VLM = Headline.same((VISION, PREFILL))
STAGE_NAMES = st.sampled_from([TOWER, PROJECTOR, PREFILL_AFTER, LM_HEAD])


@st.composite
def paired_costs(draw: st.DrawFn) -> tuple[list[StageCost], list[StageCost]]:
    """An unpruned export's FLOP stages over the VLM headline and a pruned one spending at most as much on each."""
    stages = draw(st.lists(st.tuples(st.sampled_from([VISION, PREFILL]), STAGE_NAMES), min_size=1, unique=True))
    unpruned, pruned = [], []
    for component, stage in stages:
        flops = draw(st.integers(1, 10**12))
        floor = draw(st.integers(0, flops))  # what no pruning removes: the pruned stage spends at least that
        kept = draw(st.integers(floor, flops))
        unpruned.append(StageCost(component, stage, flops, 1, floor))
        pruned.append(StageCost(component, stage, kept, 1, floor))
    if sum(c.flops for c in pruned) == 0:
        pruned[0] = replace(pruned[0], flops=1)
    return pruned, unpruned


@settings(max_examples=60, deadline=None)
@given(paired_costs(), st.floats(1e6, 1e13))
def test_one_rate_everywhere_makes_the_calibrated_ideal_the_flops_ideal(pair, rate: float) -> None:
    pruned, unpruned = pair
    measured = [MeasuredTime(c.component, c.stage, c.flops / rate * 1e3) for c in unpruned]
    ideal = ideal_speedups(pruned, unpruned, measured, VLM)
    assert ideal.basis == OPERATORS
    assert ideal.flops_ideal is not None and ideal.calibrated_ideal is not None
    assert ideal.calibrated_ideal == pytest.approx(ideal.flops_ideal, rel=1e-9)
    assert all(g == pytest.approx(rate / 1e9, rel=1e-9) for g in ideal.rates_gflops.values())


@settings(max_examples=60, deadline=None)
@given(
    paired_costs(),
    st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4),
    st.floats(0, 10),
    st.floats(0, 10),
    st.booleans(),
)
def test_pruning_no_stage_up_never_slows_the_ideal(pair, times, overhead: float, other: float, whole: bool) -> None:
    pruned, unpruned = pair
    measured = [MeasuredTime(c.component, c.stage, times[i % 4]) for i, c in enumerate(unpruned)]
    measured.append(MeasuredTime(PREFILL, "other", other))  # operators outside any stage: no FLOPs, kept as measured
    if whole:
        walls = {name: overhead / 2 + sum(t.ms for t in measured if t.component == name) for name in (VISION, PREFILL)}
        measured = per_component(walls, {VISION: overhead / 2, PREFILL: overhead / 2})
    ideal = ideal_speedups(pruned, unpruned, measured, VLM, overhead_ms=overhead)
    assert ideal.basis == (COMPONENTS if whole else OPERATORS)
    assert ideal.flops_ideal is not None and ideal.flops_ideal >= 1
    assert ideal.calibrated_ideal is not None and ideal.calibrated_ideal >= 1 - 1e-9
    assert 0 <= ideal.untouchable_share <= 1
    # what pruning cannot touch stays in the ideal time: the ideal speedup is bounded by it
    assert ideal.calibrated_ideal <= 1 / ideal.untouchable_share + 1e-6 if ideal.untouchable_share > 0 else True


def test_a_stage_the_baseline_lacks_runs_at_its_siblings_rate() -> None:
    """FastV against the unpruned model: the baseline's decoder layers are all `prefill_after`."""
    unpruned = [StageCost(PREFILL, PREFILL_AFTER, 4000, 1, 1000), StageCost(VISION, TOWER, 3000, 1, 3000)]
    pruned = [
        StageCost(PREFILL, PREFILL_BEFORE, 1000, 1, 250),
        StageCost(PREFILL, PREFILL_AFTER, 1000, 1, 750),
        StageCost(PREFILL, SELECT, 0, 1),
        StageCost(VISION, TOWER, 3000, 1, 3000),
    ]
    measured = [MeasuredTime(PREFILL, PREFILL_AFTER, 4.0), MeasuredTime(VISION, TOWER, 1.0)]
    ideal = ideal_speedups(pruned, unpruned, measured, VLM, overhead_ms=1.0)
    # decoder at 1000 FLOPs/ms: 2 ms; the tower at 3000 FLOPs/ms: 1 ms; the overhead: 1 ms
    assert ideal.ideal_ms == pytest.approx(4.0) and ideal.baseline_ms == pytest.approx(6.0)
    assert ideal.calibrated_ideal == pytest.approx(1.5) and ideal.flops_ideal == pytest.approx(7000 / 5000)
    # overhead 1 + the tower 1 + a quarter of the decoder's 4 ms
    assert ideal.untouchable_share == pytest.approx(3.0 / 6.0)
    assert ideal.rates_gflops == {PREFILL_AFTER: pytest.approx(1e-3), TOWER: pytest.approx(3e-3)}


def test_a_profile_missing_a_flop_stage_calibrates_the_component_whole() -> None:
    unpruned = [StageCost(PREFILL, PREFILL_AFTER, 4000, 1), StageCost(PREFILL, LM_HEAD, 1000, 1, 1000)]
    pruned = [StageCost(PREFILL, PREFILL_AFTER, 1000, 1), StageCost(PREFILL, LM_HEAD, 1000, 1, 1000)]
    measured = [MeasuredTime(PREFILL, PREFILL_AFTER, 5.0)]  # the LM head's time was grouped with the layers
    ideal = ideal_speedups(pruned, unpruned, measured, Headline.same((PREFILL,)))
    assert ideal.basis == COMPONENTS and ideal.calibrated_ideal == pytest.approx(2.5)
    assert ideal.rates_gflops == {PREFILL: pytest.approx(1e-3)}


def test_a_stateful_policys_pruned_step_is_matched_with_the_baselines_step() -> None:
    _, unpruned = costs_of("zoo:tiny-openvla", "none", None)
    _, pruned = costs_of("zoo:tiny-openvla", "vla-pruner", 64)
    headline = Headline((PRUNED,), (STEP,))
    ideal = ideal_speedups(pruned, unpruned, per_component({STEP: 10.0}), headline)
    assert ideal.flops_ideal == pytest.approx(total_flops(unpruned) / total_flops(pruned, (PRUNED,)))
    assert ideal.calibrated_ideal == pytest.approx(ideal.flops_ideal)  # one component: one rate
    with pytest.raises(ValueError, match="one to one"):
        Headline((WARMUP, PRUNED), (STEP,))
