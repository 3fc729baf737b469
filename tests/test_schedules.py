"""The token schedule is the one shape of decoder pruning: two test-only methods registered from here, one that
prunes at two successive layers and one that runs layers 0..a on a few representatives, a..b on every image token
again and b.. on K, and one that scores a text span's attention change, build through the same decoder rewrite as
FastV; the first and the last export to ONNX and verify (the second's shape is LVLM_CSP's, exported with it)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tpc.contract.manifest import Manifest, read_samples
from tpc.contract.names import KEPT_INDICES
from tpc.exporting import export
from tpc.inspect import describe
from tpc.methods import PrefillMethod, register
from tpc.methods.base import Param
from tpc.methods.registry import REGISTRY
from tpc.methods.schedule import ALL_ROWS, LAST_ROW, ROWS, SPAN_ROWS, Prune, Readmit, TapSpec, TokenSchedule
from tpc.ops import select_indices
from tpc.pipeline import PruneRequest, build
from tpc.verification import generation_inputs, kept_problems, verify

MODEL = "zoo:tiny-llava"  # 4 decoder layers, 256 image tokens


def _between(keep: int, image_tokens: int, fraction: float) -> int:
    return keep + round((image_tokens - keep) * fraction)


TWO_PRUNES = PrefillMethod(
    name="test-two-prunes",
    summary="test only: last-row attention at layer a-1 keeps part of the tokens, at layer a the rest of the budget",
    reference="tests/test_schedules.py",
    priority=lambda signals, keep, params: signals.scores,
    transitions=lambda params, keep, n: (
        Prune(params["layer"], _between(keep, n.image_tokens, params["first"]), LAST_ROW),
        Prune(params["layer"] + 1, keep, LAST_ROW),
    ),
    params=(
        Param("layer", int, 1, "first prune layer a", "decoder"),
        Param("first", float, 0.5, "the first prune keeps keep + first * (N - keep)", low=0.0, high=1.0),
    ),
)


def _representatives(signals, keep, params):
    return signals.image_embeds.float().norm(dim=-1)  # layer 0 has no tap: the embeddings' norms


CLUSTER_READMIT = PrefillMethod(
    name="test-cluster-readmit",
    summary="test only: layers 0..a-1 on representatives, a..b-1 on every image token again, b.. on K",
    reference="tests/test_schedules.py",
    priority=lambda signals, keep, params: signals.scores,
    transitions=lambda params, keep, n: (
        Prune(0, params["representatives"], LAST_ROW, priority=_representatives),
        Readmit(params["readmit"]),
        Prune(params["prune"], keep, params["rows"]),
    ),
    params=(
        Param("representatives", int, 32, "image tokens layers 0..a-1 see", low=1),
        Param("readmit", int, 1, "layer a at which every image token comes back", "decoder"),
        Param("prune", int, 3, "layer b from which K tokens stay", "decoder"),
        Param("rows", str, ALL_ROWS, "the attention rows layer b-1 scores with", choices=ROWS),
    ),
)


SPAN_CHANGE = PrefillMethod(
    name="test-span-change",
    summary="test only: at layer K, how much more a text span attends to each image token than one layer earlier",
    reference="tests/test_schedules.py",
    priority=lambda signals, keep, params: signals.scores - signals.previous_scores,
    transitions=lambda params, keep, n: (
        Prune(params["layer"], keep, SPAN_ROWS, span=(params["start"], params["stop"]), previous=True),
    ),
    params=(
        Param("layer", int, 3, "prune layer K (reads layers K-1 and K-2)", "decoder"),
        Param("start", int, 291, "first prompt position of the span (tiny-llava: the text after the image)", low=0),
        Param("stop", int, 303, "one past its last", low=1),
    ),
)
TEST_METHODS = (TWO_PRUNES, CLUSTER_READMIT, SPAN_CHANGE)


@pytest.fixture(scope="module", autouse=True)
def registered() -> Iterator[None]:
    for method in TEST_METHODS:
        register(method)
    yield
    for method in TEST_METHODS:
        REGISTRY.pop(method.name)


def _outputs(method: str, keep: int, params: dict[str, str]) -> dict[str, torch.Tensor]:
    pruned = build(PruneRequest(MODEL, method, keep, params))
    prefill = pruned.components["prefill"]
    with torch.no_grad():
        outputs = prefill.module(*pruned.samples(seed=1)["prefill"].values())
    return dict(zip(prefill.output_names, outputs, strict=True))


def test_schedule_layout_derives_from_transitions() -> None:
    schedule = TokenSchedule(256, (Prune(0, 32), Readmit(1), Prune(3, 16, ALL_ROWS)))
    assert schedule.tokens_per_layer(4) == (32, 256, 256, 16)
    assert schedule.lengths(47, 4) == (79, 303, 303, 63)
    assert schedule.kept_widths == (32, 16)
    assert schedule.tapped_layers() == {2: TapSpec(ALL_ROWS)}
    assert schedule.final_tokens == 16
    with pytest.raises(ValueError, match="keeps 300 of 256"):
        TokenSchedule(256, (Prune(1, 300),))
    with pytest.raises(ValueError, match="layer order"):
        TokenSchedule(256, (Prune(2, 10), Prune(1, 5)))


def test_degenerate_schedules_equal_fastv() -> None:
    """A first prune that keeps everything, or representatives that are every token re-admitted before layer 2,
    must leave exactly FastV at layer 2: the same kept set and logits, through the general gather and re-admit
    paths (the present set is no longer `arange` after the first transition)."""
    fastv = _outputs("fastv", 40, {"layer": "2"})
    two = _outputs("test-two-prunes", 40, {"layer": "1", "first": "1.0"})
    torch.testing.assert_close(two[KEPT_INDICES][:, 256:], fastv[KEPT_INDICES], rtol=0, atol=0)
    assert torch.equal(two[KEPT_INDICES][:, :256], torch.arange(256)[None])
    torch.testing.assert_close(two["logits"], fastv["logits"], rtol=1e-5, atol=1e-6)
    every = {"representatives": "256", "readmit": "1", "prune": "2", "rows": LAST_ROW}
    readmit = _outputs("test-cluster-readmit", 40, every)
    assert torch.equal(readmit[KEPT_INDICES][:, :256], torch.arange(256)[None])
    torch.testing.assert_close(readmit[KEPT_INDICES][:, 256:], fastv[KEPT_INDICES], rtol=0, atol=0)
    torch.testing.assert_close(readmit["logits"], fastv["logits"], rtol=1e-5, atol=1e-6)


def test_readmitted_tokens_keep_their_frozen_state() -> None:
    """Re-admitting right after a full-keep prune changes nothing; re-admitting after a real cut changes the
    logits (the dropped tokens come back with their layer-0 input, not their layer-1 state)."""
    base = _outputs("test-cluster-readmit", 40, {"representatives": "256", "readmit": "1", "prune": "3"})
    cut = _outputs("test-cluster-readmit", 40, {"representatives": "32", "readmit": "1", "prune": "3"})
    assert not torch.allclose(base["logits"], cut["logits"])
    rows = cut[KEPT_INDICES]
    assert kept_problems(rows.numpy(), 256, [32, 40]) == []
    assert kept_problems(rows.numpy(), 256) == ["kept_indices are not strictly ascending"]


def test_span_rows_and_layer_change_equal_eager_attention_maps() -> None:
    """The span tap and the previous-layer tap give what transformers' own attention maps give: the kept set of a
    method scoring by the change of a text span's attention between layers K-2 and K-1."""
    pruned = build(PruneRequest(MODEL, "test-span-change", 40, {}))
    generation = pruned.plan.generation()
    start, count = generation.prompt.image_start, generation.prompt.image_tokens
    pixels, ids = generation_inputs(pruned, seed=2)
    eager = LlavaForConditionalGeneration.from_pretrained(str(pruned.source.path), attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = pruned.components["prefill"].module(*pruned.samples(seed=2)["prefill"].values())
        maps = eager(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), output_attentions=True)
    span = [m[:, :, 291:303].mean(dim=(1, 2))[:, start : start + count] for m in maps.attentions]
    want = select_indices(span[2] - span[1], 40)
    assert torch.equal(outputs[-1], want)


def test_a_span_after_the_image_moves_with_the_pruned_tokens() -> None:
    layout = build(PruneRequest(MODEL, "test-two-prunes", 40, {"layer": "1"})).plan.cache
    assert layout.span_at((291, 303), 0) == (291, 303)  # 256 image tokens at layer 0
    assert layout.span_at((291, 303), 1) == (291 - 108, 303 - 108)  # 148 at layer 1
    assert layout.span_at((0, 35), 3) == (0, 35)  # before the image: never moves
    with pytest.raises(ValueError, match="not a span of text tokens"):
        layout.span_at((30, 40), 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "params", "per_layer"),
    [
        ("test-two-prunes", {"layer": "1", "first": "0.5"}, (256, 148, 40, 40)),
        # cluster -> re-admit -> prune is exported as LVLM_CSP (tests/test_catp_lvlm_csp.py)
        ("test-span-change", {}, (256, 256, 256, 40)),
    ],
)
def test_schedule_methods_export_to_onnx_and_verify(tmp_path, method, params, per_layer) -> None:
    request = PruneRequest(MODEL, method, 40, params, max_new_tokens=8)
    result = export(request, "onnx", tmp_path / "out", samples=2)
    assert result.report is not None and result.report.passed, result.report and result.report.diagnosis
    manifest = Manifest.read(tmp_path / "out")
    text = manifest.generation.prompt.text_tokens
    assert list(manifest.generation.cache.lengths_after_prefill) == [text + n for n in per_layer]
    runs = {"test-two-prunes": [148, 40], "test-span-change": [40]}[method]
    assert manifest.tokens.get("kept_runs") == (runs if len(runs) > 1 else None)  # recorded when there are several
    kept = read_samples(tmp_path / "out", "prefill", "expected.npz")[KEPT_INDICES]
    assert kept.shape == (1, sum(runs)) and np.all(kept < 256)
    ranges = describe(request)["tokens_per_layer"]
    assert [n for r in ranges for n in [r["image_tokens"]] * (r["layers"][1] - r["layers"][0] + 1)] == list(per_layer)
    assert verify(tmp_path / "out", samples=1).passed
