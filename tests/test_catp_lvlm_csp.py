"""CATP and LVLM_CSP as token schedules on a LLaVA model: their layouts worked out by hand, their selections against
transformers' own attention maps and hidden states, multi-image prompts against transformers' `generate`, the
[SEG] output, exports verified on ONNX Runtime and ExecuTorch, and bad input refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tpc.cli import main
from tpc.contract.manifest import Manifest
from tpc.contract.names import CLS_ATTENTION, KEPT_INDICES, SEG_HIDDEN
from tpc.exporting import export
from tpc.inspect import describe
from tpc.kinds.vlm import chained_samples, eager_loop
from tpc.methods import catp, uniform
from tpc.methods.registry import catp_budget
from tpc.methods.schedule import (
    LAST_ROW,
    REPRESENTATIVE,
    Block,
    PromptImages,
    Prune,
    Readmit,
    TapSpec,
    TokenSchedule,
)
from tpc.ops import select_indices
from tpc.pipeline import PruneRequest, build
from tpc.runtimes.generation import prefill_ids
from tpc.verification import generation_inputs, verify

MODEL = "zoo:tiny-llava"  # 4 decoder layers (d=64), 256 image tokens per image, [SEG] = 501
TEXT = 35 + 2 * 8 + 12  # system prefix, two examples' texts, the query's text (no tokenizer: tpc's default layout)


def _prefill(pruned, seed: int = 1) -> dict[str, torch.Tensor]:
    prefill = pruned.components["prefill"]
    with torch.no_grad():
        outputs = prefill.module(*pruned.samples(seed=seed)["prefill"].values())
    return dict(zip(prefill.output_names, outputs, strict=True))


def test_a_multi_image_schedule_tracks_blocks_of_images() -> None:
    """Three images of 10 tokens: a prune of one image keeps its count static; a prune over two makes their split
    data-dependent (one block), which a later prune may not cut apart."""
    schedule = TokenSchedule(
        30,
        (
            Prune(0, 6, rows=None, images=(0,)),
            Prune(2, 9, LAST_ROW, images=(0, 1)),
            Prune(3, 4, rows=None, images=(2,)),
        ),
        (10, 10, 10),
    )
    assert schedule.tokens_per_layer(4) == (26, 26, 19, 13)
    assert schedule.blocks_at(3, 4) == (Block((0, 1), 9), Block((2,), 4))
    assert schedule.kept_widths == (6, 9, 4) and schedule.tapped_layers() == {1: TapSpec(LAST_ROW)}
    with pytest.raises(ValueError, match="prunes part of images \\[0, 1\\]"):
        TokenSchedule(30, (Prune(1, 9, images=(0, 1)), Prune(2, 4, images=(1,))), (10, 10, 10))
    with pytest.raises(ValueError, match="must be the first transition at its layer"):
        TokenSchedule(30, (Prune(1, 5, rows=None, images=(0,)), Prune(1, 5, LAST_ROW, images=(1,))), (10, 10, 10))
    with pytest.raises(ValueError, match="every token before it must have been dropped at layer 0"):
        TokenSchedule(30, (Prune(1, 5), Readmit(2, REPRESENTATIVE)))
    with pytest.raises(ValueError, match="names images \\[3\\]"):
        TokenSchedule(30, (Prune(1, 5, images=(3,)),), (10, 10, 10))


def test_catp_budget_and_schedule_worked_by_hand() -> None:
    """N = 3 x 256, keep 64: R = 1 - 64/768, stage 1 keeps floor(256 (768 + 64) / 1536) = 138 per image; after
    layer K the two examples keep round(64 * 512/768) = 43 together, after K+1 the query 64 - 43 = 21."""
    prompt = PromptImages((35, 35 + 264, 35 + 2 * 264), (256, 256, 256), TEXT + 768)
    assert catp_budget(64, prompt, None) == ((138, 138, 138), 43, 21)
    plan = build(PruneRequest(MODEL, "catp", 64, {"shots": "2"})).plan
    assert plan.prompt.image_starts == (35, 299, 563) and plan.prompt.text_len == TEXT
    assert plan.schedule.tokens_per_layer(4) == (414, 414, 181, 64)  # layer K = 2 on a 4-layer decoder
    assert plan.schedule.kept_widths == (138, 138, 138, 43, 21)
    assert plan.cache.kept_lengths == (TEXT + 414, TEXT + 414, TEXT + 181, TEXT + 64)
    assert plan.cache.capacities == tuple(n + 31 for n in plan.cache.kept_lengths)  # 32 new tokens
    plan_view = describe(PruneRequest(MODEL, "catp", 64, {"shots": "2"}))
    blocks = [r["per_image"] for r in plan_view["tokens_per_layer"]]
    assert blocks[-1] == [{"images": [0, 1], "tokens": 43}, {"images": [2], "tokens": 21}]
    assert all(sum(b["tokens"] for b in r["per_image"]) == r["image_tokens"] for r in plan_view["tokens_per_layer"])
    assert plan_view["tokens"] == {"before": 768, "after": 64}


def test_lvlm_csp_schedule_worked_by_hand() -> None:
    """4 layers: representatives N/4 = 64 in layer 0 (8 of 32 scaled), all 256 in layer 1, K from layer 2 (16 of
    32 scaled); the uniform representatives are i * 4."""
    pruned = build(PruneRequest(MODEL, "lvlm-csp", 40, {}))
    assert pruned.plan.schedule.tokens_per_layer(4) == (64, 256, 40, 40)
    assert pruned.plan.cache.kept_lengths == (47 + 64, 47 + 256, 47 + 40, 47 + 40)
    kept = _prefill(pruned)[KEPT_INDICES]
    assert torch.equal(kept[:, :64], uniform.indices(256, 64)[None])
    assert torch.equal(kept[:, :64], torch.arange(0, 256, 4)[None])


def _hf(pruned) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(str(pruned.source.path), attn_implementation="eager").eval()


def test_catp_stages_equal_a_reference_on_transformers_outputs() -> None:
    """Stage 1 from transformers' projected image features and text embeddings; stages 2 and 3 from the eager
    attention maps and hidden states of transformers' decoder run on the stage-1 sequence at its original
    positions."""
    pruned = build(PruneRequest(MODEL, "catp", 64, {"shots": "2"}))
    prompt = pruned.plan.generation().prompt
    starts, count = prompt.starts, prompt.image_tokens
    pixels, ids = generation_inputs(pruned, seed=3)
    got = _prefill_on(pruned, pixels, ids)[KEPT_INDICES][0]
    model = _hf(pruned)
    ids_t = torch.from_numpy(ids)
    with torch.no_grad():
        features = torch.stack(model.get_image_features(pixel_values=torch.from_numpy(pixels[0])).pooler_output)
        embeds = model.get_input_embeddings()(ids_t)[0]
    stage1 = []
    for i, start in enumerate(starts):
        text_stop = starts[i + 1] if i + 1 < len(starts) else ids.shape[1]
        kept = catp.stage1(features[i], embeds[start + count : text_stop], 138)
        stage1.append(kept + i * count)
    assert torch.equal(got[: 3 * 138], torch.cat(stage1))
    # the stage-1 sequence: text + each image's kept tokens, at their original positions
    full = embeds.clone()
    for i, start in enumerate(starts):
        full[start : start + count] = features[i]
    image_positions = torch.cat([torch.tensor(starts[i]) + (stage1[i] - i * count) for i in range(3)])
    text_positions = torch.tensor([p for p in range(ids.shape[1]) if not any(s <= p < s + count for s in starts)])
    positions = torch.sort(torch.cat([image_positions, text_positions])).values
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=full[positions][None],
            position_ids=positions[None],
            output_attentions=True,
            output_hidden_states=True,
        )
    layer = pruned.plan.params["layer"]
    context = positions < starts[2]
    context_image = torch.isin(positions, image_positions) & context
    last = [a[0, :, -1, :].mean(dim=0) for a in out.attentions]
    hidden = out.hidden_states[layer - 1][0]  # entering the paper's layer K (tpc's layer K-1): A4's default
    query = hidden[positions >= starts[2]]
    scores = catp.context_scores(
        last[layer - 2][context_image], last[layer - 1][context_image], hidden[context_image], query, 0.6
    )
    chosen = image_positions.sort().values[: 2 * 138][select_indices(scores[None], 43)[0]]
    want = torch.stack([(p - starts[0]) if p < starts[1] else (p - starts[1] + count) for p in chosen])
    assert torch.equal(got[3 * 138 : 3 * 138 + 43], want)
    # stage 3 before layer K+1: the query image's tokens against the kept examples' image tokens, both as they
    # enter layer K (the paper's layer K+1: A4's input) -- computed over the stage-1 sequence, since the examples'
    # prune happens after layer K-1
    entering = out.hidden_states[layer][0]
    query_image = torch.isin(positions, image_positions) & (positions >= starts[2])
    kept_context = torch.isin(positions, chosen)
    scores = catp.query_scores(entering[query_image], entering[kept_context])
    want = stage1[2][select_indices(scores[None], 21)[0]]
    assert torch.equal(got[-21:], want)


def _prefill_on(pruned, pixels: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
    samples = chained_samples(
        pruned.plan, pruned.components, torch.from_numpy(pixels), prefill_ids(pruned.plan.generation(), ids)
    )
    prefill = pruned.components["prefill"]
    with torch.no_grad():
        outputs = prefill.module(*samples["prefill"].values())
    return dict(zip(prefill.output_names, outputs, strict=True))


def test_lvlm_csp_cls_attention_representatives_are_the_towers_cls_row() -> None:
    """The cls-attention sampler's representatives: the top N_c of the CLS row's attention (head mean) at the
    feature layer, as transformers' eager CLIP attention maps give it."""
    pruned = build(PruneRequest(MODEL, "lvlm-csp", 40, {"sampler": "cls-attention", "representatives": "32"}))
    vision = pruned.components["vision"]
    assert CLS_ATTENTION in vision.output_names and CLS_ATTENTION in pruned.components["prefill"].input_names
    pixels, ids = generation_inputs(pruned, seed=4)
    model = _hf(pruned)
    with torch.no_grad():
        maps = model.model.vision_tower(torch.from_numpy(pixels), output_attentions=True).attentions
        encoded = dict(zip(vision.output_names, vision.module(torch.from_numpy(pixels)), strict=True))
    layer = pruned.plan.cut.cls_layer
    cls_row = maps[layer - 1][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(encoded[CLS_ATTENTION], cls_row, rtol=1e-5, atol=1e-6)
    kept = _prefill_on(pruned, pixels, ids)[KEPT_INDICES]
    assert torch.equal(kept[:, :32], select_indices(cls_row, 32))


def test_lvlm_csp_readmit_rules() -> None:
    """Every token as its own representative makes either re-admit rule a no-op: FastV at the prune layer. With
    64 representatives the two rules give different states, so different logits."""
    fastv = _prefill(build(PruneRequest(MODEL, "fastv", 40, {"layer": "2"})))
    for readmit in ("representative", "embedding"):
        every = {"representatives": "256", "cluster_end": "1", "prune_start": "2", "readmit": readmit}
        csp = _prefill(build(PruneRequest(MODEL, "lvlm-csp", 40, every)))
        assert torch.equal(csp[KEPT_INDICES][:, 256:], fastv[KEPT_INDICES])
        torch.testing.assert_close(csp["logits"], fastv["logits"], rtol=1e-5, atol=1e-5)
    copied = _prefill(build(PruneRequest(MODEL, "lvlm-csp", 40, {"readmit": "representative"})))
    frozen = _prefill(build(PruneRequest(MODEL, "lvlm-csp", 40, {"readmit": "embedding"})))
    assert not torch.allclose(copied["logits"], frozen["logits"])


def test_seg_hidden_is_the_final_hidden_state_at_seg() -> None:
    """The prompt ends with [SEG]; `seg_hidden` is transformers' last hidden state there (the unpruned model), and
    the prefill's last position for every method."""
    pruned = build(PruneRequest(MODEL, "none", None, {}))
    pixels, ids = generation_inputs(pruned, seed=5)
    assert ids[0, -1] == 501
    model = _hf(pruned)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    got = _prefill_on(pruned, pixels, ids)[SEG_HIDDEN]
    torch.testing.assert_close(got, want.hidden_states[-1][:, -1], rtol=1e-4, atol=1e-5)


def test_multi_image_prompt_generates_as_transformers() -> None:
    """`--method none` with a 2-shot prompt: the vision graph runs once per image and the greedy tokens equal
    transformers' `generate` on the same three images and interleaved prompt."""
    pruned = build(PruneRequest(MODEL, "none", None, {"shots": "2"}, max_new_tokens=8))
    pixels, ids = generation_inputs(pruned, seed=6)
    assert pixels.shape[:2] == (1, 3) and (ids == 500).sum() == 3 * 256
    got = eager_loop(pruned).generate(pixels, ids, stop_at_eos=False)
    model = LlavaForConditionalGeneration.from_pretrained(str(pruned.source.path)).eval()
    with torch.no_grad():
        want = model.generate(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(pixels[0]),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
        )[:, ids.shape[1] :]
    assert np.array_equal(got, want.numpy())


BAD = [
    (
        ["--method", "catp", "--keep", "64", "--param", "shots=0"],
        "method catp needs an in-context prompt of at least 1",
    ),
    (["--method", "catp", "--keep", "64", "--param", "shots=-1"], "--param shots=-1: expected a value >= 0"),
    (
        ["--method", "catp", "--keep", "200", "--param", "shots=2", "--param", "stage1_keep=50"],
        "keep 200 is more than stage 1 leaves: the context keeps 133 of 100 and the query 67 of 50",
    ),
    (
        ["--method", "catp", "--keep", "64", "--param", "layer=1"],
        "stage 2 compares the attention of layers K-1 and K-2",
    ),
    (["--method", "catp", "--keep", "64", "--param", "layer=3"], "a transition at layer 4 is past the last layer (3)"),
    (["--method", "catp", "--keep", "769"], "--keep 769 is out of range: the prompt's 3 images are 768 image tokens"),
    (
        ["--method", "lvlm-csp", "--keep", "64", "--param", "cluster_end=2", "--param", "prune_start=1"],
        "cluster_end=2 must come before prune_start=1",
    ),
    (["--method", "lvlm-csp", "--keep", "64", "--param", "prune_start=4"], "outside the decoder's layers 1..3"),
    (["--method", "lvlm-csp", "--keep", "64", "--param", "cluster_end=0"], "outside the decoder's layers 1..3"),
    (
        ["--method", "lvlm-csp", "--keep", "64", "--param", "representatives=257"],
        "representatives=257 is more than the prompt's 256 image tokens",
    ),
    (["--method", "lvlm-csp", "--keep", "64", "--param", "readmit=copy"], "expected one of representative, embedding"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_catp_and_lvlm_csp_input_is_one_line_exit_2(tmp_path, capsys, args: list[str], message: str) -> None:
    code = main(["export", MODEL, "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_catp_is_refused_by_a_policy(capsys) -> None:
    assert main(["inspect", "zoo:tiny-openvla", "--method", "catp", "--keep", "64"]) == 2
    assert "does not apply to openvla" in capsys.readouterr().err


@pytest.mark.slow
def test_catp_exports_to_onnx_and_verifies(tmp_path) -> None:
    """One example image and a short stage 1 (each greedy step is unrolled into the graph: 2 x 40 here, 3 x 138
    for the default 2-shot keep-64 budget, which `make demo`-sized runs export in a few minutes)."""
    request = PruneRequest(MODEL, "catp", 32, {"shots": "1", "stage1_keep": "40"}, max_new_tokens=8)
    result = export(request, "onnx", tmp_path / "catp", samples=2)
    assert result.report is not None and result.report.passed, result.report and result.report.diagnosis
    assert result.report.generation is not None and result.report.generation.seg_tokens >= 2  # prompts end in [SEG]
    manifest = Manifest.read(tmp_path / "catp")
    assert manifest.generation.prompt.image_starts == (35, 299) and manifest.params["shots"] == 1
    assert manifest.tokens.get("kept_runs") == [40, 40, 16, 16]
    assert verify(tmp_path / "catp", samples=1).passed


@pytest.mark.slow
@pytest.mark.parametrize(("target", "params"), [("onnx", {"sampler": "cls-attention"}), ("executorch", {})])
def test_lvlm_csp_exports_with_seg_hidden_and_verifies(tmp_path, target, params) -> None:
    """ONNX with the cls-attention sampler (the vision graph's `cls_attention` feeds the prefill), ExecuTorch with
    the default uniform one; both with `seg_hidden` on prefill and decode."""
    request = PruneRequest(MODEL, "lvlm-csp", 64, params, max_new_tokens=8)
    result = export(request, target, tmp_path / target, samples=2)
    assert result.report is not None and result.report.passed, result.report and result.report.diagnosis
    manifest = Manifest.read(tmp_path / target)
    outputs = {c.name: [s.name for s in c.outputs] for c in manifest.components}
    assert SEG_HIDDEN in outputs["prefill"] and SEG_HIDDEN in outputs["decode"]
    assert manifest.generation.seg_token_id == 501
    assert result.report.generation is not None and result.report.generation.seg_tokens >= 2
    if params:
        assert CLS_ATTENTION in outputs["vision"] and manifest.generation.vision_to_prefill == (CLS_ATTENTION,)


def test_lvlm_csp_runs_a_policy_step() -> None:
    """The same schedule on an OpenVLA step (256 image tokens, 4 layers): uniform representatives in layer 0, all
    tokens in layer 1, K from layer 2; the step's kept runs are the representatives, then the K."""
    pruned = build(PruneRequest("zoo:tiny-openvla", "lvlm-csp", 32, {}))
    assert pruned.plan.layout().schedule.tokens_per_layer(4) == (64, 256, 32, 32)
    step = pruned.components["step"]
    with torch.no_grad():
        outputs = dict(zip(step.output_names, step.module(*pruned.samples(seed=1)["step"].values()), strict=True))
    assert torch.equal(outputs[KEPT_INDICES][:, :64], torch.arange(0, 256, 4)[None])
    assert outputs[KEPT_INDICES].shape == (1, 96)
