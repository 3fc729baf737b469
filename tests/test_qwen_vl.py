"""Qwen2.5-VL and Qwen3-VL: M-RoPE positions, DeepStack, HiPrune-Qwen's golden, exports verified, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tpc.cli import main
from tpc.errors import UsageError
from tpc.kinds.vlm import eager_loop
from tpc.methods import REGISTRY, VisionSignals, divprune, hiprune
from tpc.models_zoo import FAMILIES, resolve
from tpc.passes.qwen_vision import patchify
from tpc.passes.vlm_components import mrope_position_ids
from tpc.pipeline import PruneRequest, build
from tpc.runtimes import VLM
from tpc.verification import generation_inputs, verify

QWEN25, QWEN3 = "zoo:tiny-qwen25vl", "zoo:tiny-qwen3vl"


def _hf_generate(model: PreTrainedModel, pixels: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """transformers' own greedy generation on the processor's inputs: flattened patches, grid_thw, token types."""
    vision = model.config.vision_config
    patches = patchify(
        torch.from_numpy(pixels), vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    )
    side = pixels.shape[-1] // vision.patch_size
    input_ids = torch.from_numpy(ids)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=patches.reshape(-1, patches.shape[-1]),
            image_grid_thw=torch.tensor([[1, side, side]] * len(ids)),
            mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
            max_new_tokens=n,
            do_sample=False,
        )
    return out[:, ids.shape[1] :].numpy()


def _unpruned_equals_generate(model: str, params: dict[str, str] | None = None, seeds: int = 2) -> None:
    """tpc's unpruned components, run by the generation loop, generate transformers' tokens."""
    pruned = build(PruneRequest(model, "none", None, params or {}, max_new_tokens=12))
    hf = pruned.source.adapter.load(pruned.source.path)
    loop = eager_loop(pruned)
    for seed in range(seeds):
        pixels, ids = generation_inputs(pruned, seed)
        np.testing.assert_array_equal(loop.generate(pixels, ids, stop_at_eos=False), _hf_generate(hf, pixels, ids, 12))


@pytest.mark.parametrize("model", [QWEN25, QWEN3])
def test_unpruned_model_generates_what_transformers_generates(model: str) -> None:
    _unpruned_equals_generate(model)


def test_mrope_positions_are_transformers_rope_index_kept_tokens_keep_theirs() -> None:
    pruned = build(PruneRequest(QWEN25, "random", 24, max_new_tokens=8))
    plan, model = pruned.plan, pruned.source.adapter.load(pruned.source.path)
    layout, grid = plan.cache, plan.adapter.grid(plan.source.config)
    full = np.concatenate(
        [np.full(layout.image_start, 5), np.full(grid.tokens, model.config.image_token_id), np.full(13, 5)]
    )[None]
    ids = torch.from_numpy(full)
    side = grid.image_size // grid.patch_size
    want, deltas = model.model.get_rope_index(
        ids, (ids == model.config.image_token_id).int(), image_grid_thw=torch.tensor([[1, side, side]])
    )
    want = want.permute(1, 2, 0)  # (B, L, 3)
    kept = torch.tensor([[0, 5, 9, 17, 30, 33, 40, 41, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 1, 2]])
    kept = kept.sort(dim=1).values
    got = mrope_position_ids(grid.positions()[kept], layout)
    start = layout.image_start
    expected = torch.cat([want[:, :start], want[:, start + kept[0]], want[:, start + grid.tokens :]], dim=1)
    assert torch.equal(got, expected)
    assert layout.next_position == full.shape[1] + int(deltas)  # decode continues from transformers' rope_deltas


def test_hiprune_qwen_golden_through_the_model_level_priority(golden_dir: Path) -> None:
    """The golden's reduced vectors (a 32-block tower's blocks 16 and 32) through what the Qwen vision graph calls:
    the HiPrune record's priority with the family's default blocks, then the select op: the reference's kept sets
    (no duplicates in the golden), and the retain ratio giving the reference's N'."""
    adapter = FAMILIES["qwen2_5_vl"]
    config = Qwen2_5_VLConfig(vision_config={"depth": 32})
    params = REGISTRY["hiprune"].resolve_params({}, adapter.vision_defaults(REGISTRY["hiprune"], config))
    assert (params["object_layer"], params["deep_layer"]) == (16, 32)
    with np.load(golden_dir / "hiprune_qwen25vl_seed0_reduced.npz") as data:
        shallow, deep = torch.from_numpy(data["reduced_obj"])[None], torch.from_numpy(data["reduced_last"])[None]
        grid = tuple(int(v) // 2 for v in data["grid_thw"][1:])
        for retain in ("0.334", "0.223", "0.112"):
            assert int(data[f"n_duplicates_r{retain}"]) == 0
            keep = round(shallow.shape[1] * float(retain))
            signals = VisionSignals(received={16: shallow, 32: deep}, features=shallow[..., None], grid=grid)
            priority = REGISTRY["hiprune"].priority(signals, keep, params)
            kept = torch.topk(priority, keep).indices.sort().values[0].numpy()
            np.testing.assert_array_equal(kept, data[f"kept_r{retain}"])


def test_static_fill_differs_from_the_reference_only_by_filling_duplicates() -> None:
    """Where an anchor is also a top deep token, the reference picks it again as a register and keeps N' - 1 tokens;
    tpc's static form keeps N': the reference's set plus the best deep token outside it and the anchor/buffer set."""
    generator = torch.Generator().manual_seed(3)
    shallow, deep = torch.rand(196, generator=generator), torch.rand(196, generator=generator) * 0.5
    deep[int(shallow.argmax())] = 5.0  # an attention sink that is also the anchor
    reference = set(hiprune.qwen_select_reference(shallow, deep, 0.334, (1, 28, 28)).tolist())
    static = set(hiprune.qwen_select(shallow, deep, 0.334, (1, 28, 28)).tolist())
    budget = hiprune.qwen_budget(196, 0.334)
    assert len(static) == budget and len(reference) == budget - 1 and reference < static
    mask = hiprune.anchor_buffer_mask(shallow[None], budget, (14, 14), hiprune.DEFAULT_ALPHA)[0]
    outside = [i for i in range(196) if not mask[i] and i not in reference]
    assert static - reference == {max(outside, key=lambda i: float(deep[i]))}


def test_reference_count_marks_exactly_the_references_set() -> None:
    """`qwen_duplicates=reference`: the static mask of what the reference keeps equals its data-dependent selection,
    duplicates included, and lies inside the static fill's N' slots."""
    duplicates = 0
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        shallow, deep = torch.rand(196, generator=generator), torch.rand(196, generator=generator) * 2
        if seed % 2:
            deep[int(shallow.argmax())] = 5.0  # a sink on the anchor
        retain = (0.334, 0.223, 0.112, 0.5)[seed % 4]
        reference = hiprune.qwen_select_reference(shallow, deep, retain, (1, 28, 28))
        budget = hiprune.qwen_budget(196, retain)
        kept = hiprune.qwen_reference_kept(shallow[None], deep[None], budget, (14, 14))[0]
        assert torch.equal(torch.arange(196)[kept], reference)
        assert set(reference.tolist()) <= set(hiprune.qwen_select(shallow, deep, retain, (1, 28, 28)).tolist())
        duplicates += budget - len(reference)
    assert duplicates >= 20  # the cases exercise the quirk


def test_masked_slots_equal_the_references_shorter_prompt() -> None:
    """A slot the reference does not keep is masked out of every prefill layer and decode step: the logits equal
    transformers' Qwen decoder run on the prompt without that token (original M-RoPE positions kept)."""
    pruned = build(PruneRequest(QWEN25, "hiprune", 32, {"qwen_duplicates": "reference"}, max_new_tokens=8))
    prefill, decode = pruned.components["prefill"].module, pruned.components["decode"].module
    inputs = dict(pruned.samples(0)["prefill"])
    valid = torch.ones_like(inputs["image_valid"])
    valid[:, [3, 17]] = 0  # two slots of re-picked anchors
    inputs["image_valid"] = valid
    with torch.no_grad():
        out = dict(zip(prefill.output_names, prefill(*inputs.values()), strict=True))
        token = out["logits"].argmax(-1, keepdim=True)
        past = [out[name.replace("past.", "present.", 1)] for name in decode.input_names[2:]]
        step = dict(zip(decode.output_names, decode(token, torch.zeros(1, dtype=torch.int64), *past), strict=True))
    layout, model = pruned.plan.cache, prefill.decoder.model
    text = model.model.language_model
    start = layout.image_start
    hidden = text.embed_tokens(inputs["input_ids"])
    hidden = torch.cat([hidden[:, :start], inputs["image_embeds"], hidden[:, start + 32 :]], dim=1)
    positions = mrope_position_ids(inputs["image_positions"], layout)
    keep = torch.ones(hidden.shape[1], dtype=torch.bool)
    keep[[start + 3, start + 17]] = False
    with torch.no_grad():
        first = text(inputs_embeds=hidden[:, keep], position_ids=positions[:, keep].permute(2, 0, 1), use_cache=True)
        torch.testing.assert_close(model.lm_head(first.last_hidden_state[:, -1]), out["logits"], rtol=1e-4, atol=1e-5)
        after = torch.full((3, 1, 1), layout.next_position)
        second = text(inputs_embeds=text.embed_tokens(token), position_ids=after, past_key_values=first.past_key_values)
    torch.testing.assert_close(model.lm_head(second.last_hidden_state[:, -1]), step["logits"], rtol=1e-4, atol=1e-5)


EXACT = {"qwen_duplicates": "reference"}


@pytest.mark.parametrize(("model", "method", "params"), [(QWEN25, "hiprune", EXACT), (QWEN3, "fastv", {})])
def test_onnx_exports_verify(exported: Callable[..., Path], model: str, method: str, params: dict) -> None:
    """A windowed tower's taps with the reference's count (Qwen2.5-VL HiPrune: `image_valid`, the cache's key mask
    fed back to decode); a prefill prune between DeepStack levels (Qwen3-VL FastV)."""
    report = verify(exported(model, method, 32, params), samples=2)
    assert report.passed, report.diagnosis
    assert report.kept_rows_agreeing == report.kept_rows > 0
    assert report.generation is not None and report.generation.passed


def test_executorch_export_verifies(tmp_path: Path) -> None:
    """Qwen3-VL HiPrune as one .pte: the tower's taps, the DeepStack features gathered with the kept indices, the
    M-RoPE prefill; verified in executorch.runtime down to greedy generation."""
    out = tmp_path / "D"
    args = ["--method", "hiprune", "--keep", "32", "--target", "executorch", "--output", str(out)]
    assert main(["export", QWEN3, *args]) == 0  # export verifies before it commits
    outputs = {s.name for s in VLM.load(out).manifest.component("vision").outputs}
    assert outputs == {"image_embeds", "kept_indices", "image_positions", "deepstack_embeds"}


def test_divprune_measures_the_mergers_outputs() -> None:
    """DivPrune on a Qwen scores the LLM input embeddings, the merger's outputs in raster order (transformers'
    `get_image_features`), and hands on the kept ones."""
    pruned = build(PruneRequest(QWEN25, "divprune", 24))
    model = pruned.source.adapter.load(pruned.source.path)
    pixels = pruned.samples(seed=3)["vision"]["pixel_values"]
    vision = model.config.vision_config
    patches = patchify(pixels, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)[0]
    side = pixels.shape[-1] // vision.patch_size
    with torch.no_grad():
        embeds, kept, _ = pruned.components["vision"].module(pixels)
        merged = model.model.visual(patches, grid_thw=torch.tensor([[1, side, side]])).pooler_output
    want = divprune.select(merged[None], 24)
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    torch.testing.assert_close(embeds[0], merged[want[0]], rtol=1e-4, atol=1e-5)


def test_deepstack_reaches_only_the_tokens_a_prefill_prune_kept(exported: Callable[..., Path]) -> None:
    """Qwen3-VL FastV pruning at decoder layer 1, between the two DeepStack levels: the prefill equals a reference
    built from transformers' own decoder layers, rotary and `_deepstack_process` (level 0 on every image token,
    level 1 on the kept ones only)."""
    pruned = build(PruneRequest(QWEN3, "fastv", 16, {"layer": "1"}, max_new_tokens=8))
    samples = pruned.samples(0)
    inputs = samples["prefill"]
    with torch.no_grad():
        out = pruned.components["prefill"].module(*inputs.values())
    kept = out[-1]
    model = pruned.components["prefill"].module.decoder.model
    text = model.model.language_model
    layout = pruned.plan.cache
    start, count = layout.image_start, layout.image_tokens
    hidden = text.embed_tokens(inputs["input_ids"])
    hidden = torch.cat([hidden[:, :start], inputs["image_embeds"], hidden[:, start + count :]], dim=1)
    positions = mrope_position_ids(inputs["image_positions"], layout)
    deepstack = inputs["deepstack_embeds"]
    rotary = text.rotary_emb(hidden, positions.permute(2, 0, 1))
    image_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    image_mask[:, start : start + count] = True
    hidden = text.layers[0](hidden, attention_mask=None, position_embeddings=rotary)  # SDPA: causal
    hidden = text._deepstack_process(hidden, image_mask, deepstack[0, :, 0])
    keep_rows = torch.cat([torch.arange(start), start + kept[0], torch.arange(start + count, hidden.shape[1])])
    hidden, positions, image_mask = hidden[:, keep_rows], positions[:, keep_rows], image_mask[:, keep_rows]
    rotary = text.rotary_emb(hidden, positions.permute(2, 0, 1))
    hidden = text.layers[1](hidden, attention_mask=None, position_embeddings=rotary)
    hidden = text._deepstack_process(hidden, image_mask, deepstack[0, kept[0], 1])
    for layer in text.layers[2:]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary)
    logits = model.lm_head(text.norm(hidden[:, -1]))
    torch.testing.assert_close(out[0], logits, rtol=1e-4, atol=1e-5)


def _user_qwen25(tmp_path: Path) -> Path:
    """A Qwen2.5-VL not in the zoo: a 3-block tower with one full-attention block (0) and 48 px windows, a 3-layer
    decoder; no image size in its config."""
    text = {
        "vocab_size": 300, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024, "bos_token_id": 1,
        "eos_token_id": 2, "initializer_range": 0.1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
            "window_size": 48, "fullatt_block_indexes": [0], "out_hidden_size": 48, "initializer_range": 0.2,
        },
        text_config=text, image_token_id=299, video_token_id=298, vision_start_token_id=296, vision_end_token_id=297,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / "user-qwen25vl"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


def test_user_qwen25_directory_exports_verifies_and_generates_as_transformers(tmp_path: Path) -> None:
    path = _user_qwen25(tmp_path)
    assert resolve(str(path)).adapter.family == "qwen2_5_vl"
    _unpruned_equals_generate(str(path), {"image_size": "96"}, seeds=1)
    out = tmp_path / "D"
    args = ["--method", "hiprune", "--param", "retain=0.25", "--param", "image_size=96", "--target", "onnx"]
    assert main(["export", str(path), *args, "--output", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    manifest = VLM.load(out).manifest
    assert manifest.params["image_size"] == 96 and manifest.keep == 36  # round(144 x 0.25)


def test_a_single_image_export_refuses_two_images(exported: Callable[..., Path]) -> None:
    directory = exported(QWEN25, "hiprune", 32, EXACT)
    pruned = build(PruneRequest(QWEN25, "hiprune", 32, EXACT))
    pixels, ids = generation_inputs(pruned, 0)
    with pytest.raises(UsageError, match="pixel_values"):
        VLM.load(directory).generate(np.stack([pixels, pixels], axis=1), ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "hiprune", "--keep", "65"], "one image is 64 image tokens in the prompt (use 1..64)"),
        (["--method", "hiprune", "--keep", "8", "--param", "image_size=72"], "not a positive multiple of 32 px"),
        (["--method", "none", "--param", "shots=1"], "takes one image per prompt"),
        (["--method", "catp", "--keep", "8"], "does not apply to qwen2_5_vl models yet"),
        (["--method", "fastv", "--keep", "8", "--param", "scoring=windowed"], "--param scoring applies to methods"),
        (["--method", "hiprune", "--keep", "8", "--param", "retain=0.5"], "disagree"),
        (["--method", "hiprune", "--keep", "8", "--param", "scoring=eager"], "expected one of global, windowed"),
        (["--method", "fastv", "--keep", "8", "--param", "qwen_duplicates=reference"], "applies to hiprune"),
    ],
)
def test_bad_qwen_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list, message: str):
    code = main(["export", QWEN25, "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_video_only_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _user_qwen25(tmp_path)
    config = (path / "config.json").read_text().replace('"image_token_id": 299', '"image_token_id": null')
    (path / "config.json").write_text(config)
    capsys.readouterr()
    code = main(["export", str(path), "--method", "none", "--param", "image_size=96", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "image_token_id" in err and len(err.strip().splitlines()) == 1, err


def test_inspect_shows_merged_tokens_and_qwen_taps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", QWEN3, "--method", "hiprune", "--keep", "16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sum over query rows" in out and "tokens: 64 -> 16" in out and "prefill sees 44 positions" in out
