"""The functional APIs reproduce the reference implementations' golden vectors exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tpc.methods import divprune, hiprune


@pytest.fixture(scope="module")
def llava(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "hiprune_llava15_seed0.npz") as data:
        return {k: data[k] for k in data.files}


def test_hiprune_scores_match_reference(llava: dict) -> None:
    for attn_key, score_key in (("attn_layer9_idx8", "score_obj_fp32"), ("attn_layer23_idx22", "score_deep_fp32")):
        scores = hiprune.scores(torch.from_numpy(llava[attn_key]).float(), prefix_tokens=1)
        assert scores.shape == (1, 576)
        np.testing.assert_allclose(scores[0].numpy(), llava[score_key], rtol=1e-5, atol=0)


@pytest.mark.parametrize("keep", [64, 128, 192])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_hiprune_llava_kept_sets_exact(llava: dict, keep: int, precision: str) -> None:
    score_obj = torch.from_numpy(llava[f"score_obj_{precision}"])[None]
    score_deep = torch.from_numpy(llava[f"score_deep_{precision}"])[None]
    kept = hiprune.select(score_obj, score_deep, keep, grid=24)
    np.testing.assert_array_equal(kept[0].numpy(), llava[f"kept_{precision}_k{keep}"])
    mask = hiprune.anchor_buffer_mask(score_obj, keep, (24, 24), hiprune.DEFAULT_ALPHA)[0]
    np.testing.assert_array_equal(np.flatnonzero(mask.numpy()), llava[f"anchor_buffer_set_{precision}_k{keep}"])


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_hiprune_from_attention_maps_end_to_end(llava: dict, keep: int) -> None:
    score_obj = hiprune.scores(torch.from_numpy(llava["attn_layer9_idx8"]).float())
    score_deep = hiprune.scores(torch.from_numpy(llava["attn_layer23_idx22"]).float())
    kept = hiprune.select(score_obj, score_deep, keep, grid=(24, 24))
    np.testing.assert_array_equal(kept[0].numpy(), llava[f"kept_fp32_k{keep}"])


@pytest.mark.parametrize("retain", ["0.334", "0.223", "0.112"])
def test_hiprune_qwen_reduced_exact(golden_dir: Path, retain: str) -> None:
    with np.load(golden_dir / "hiprune_qwen25vl_seed0_reduced.npz") as data:
        shallow, deep = torch.from_numpy(data["reduced_obj"]), torch.from_numpy(data["reduced_last"])
        grid, expected = data["grid_thw"], data[f"kept_r{retain}"]
        budget, duplicates = int(data[f"visual_token_num_r{retain}"]), int(data[f"n_duplicates_r{retain}"])
    assert hiprune.qwen_budget(len(deep), float(retain)) == budget
    reference = hiprune.qwen_select_reference(shallow, deep, float(retain), grid)
    np.testing.assert_array_equal(reference.numpy(), expected)
    static = hiprune.qwen_select(shallow, deep, float(retain), grid)
    assert static.shape == (budget,)
    if duplicates == 0:
        np.testing.assert_array_equal(static.numpy(), expected)
    assert set(expected.tolist()) <= set(static.tolist())


@pytest.mark.parametrize("keep", [56, 64, 128, 192])
def test_divprune_greedy_order_and_kept_exact(golden_dir: Path, keep: int) -> None:
    with np.load(golden_dir / "divprune_llava15_seed0.npz") as data:
        embeds = torch.from_numpy(data["image_embeds_fp16valued"]).float()[None]
        order, kept = data[f"greedy_order_k{keep}"], data[f"kept_sorted_k{keep}"]
    np.testing.assert_array_equal(divprune.greedy_order(embeds, keep)[0].numpy(), order)
    np.testing.assert_array_equal(divprune.select(embeds, keep)[0].numpy(), kept)
