"""The rules beyond the golden files: other seeds, anchors on grid corners and row edges, ties, budgets.

Each reference below is a direct port of the public reference loop (dynamic shapes, `unique`, `deep - 1`,
Python loops), written independently of tpc's static formulation, with ties broken by (value desc, index asc).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpc.methods import divprune, fastv, hiprune, random, uniform


def stable_topk(values: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-values, kind="stable")[:k]


def reference_hiprune(score_obj: np.ndarray, score_deep: np.ndarray, keep: int, width: int, alpha: float = 0.1):
    n = len(score_obj)
    anchors = stable_topk(score_obj, round(keep * alpha / 5))
    candidates = np.clip(
        np.concatenate([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]), 0, n - 1
    )
    anchor_buffer = np.unique(candidates)
    deep = score_deep.astype(np.float64).copy()
    deep[anchor_buffer] -= 1.0
    registers = stable_topk(deep, keep - len(anchor_buffer))
    return np.sort(np.concatenate([anchor_buffer, registers]))


def attention_like_scores(rng: np.random.Generator, n: int, peaks: list[int] = ()) -> np.ndarray:
    """Positive scores summing to 1, like attention received, with optional planted peaks."""
    logits = rng.standard_normal(n)
    for rank, position in enumerate(peaks):
        logits[position] = 8.0 - rank * 0.1
    weights = np.exp(logits)
    return (weights / weights.sum()).astype(np.float32)


@pytest.mark.parametrize("seed", range(1, 7))
@pytest.mark.parametrize("grid", [(24, 24), (16, 16), (12, 20)])
@pytest.mark.parametrize("keep", [26, 64, 128])
def test_hiprune_matches_reference_loop_other_seeds(seed: int, grid: tuple[int, int], keep: int) -> None:
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    score_obj, score_deep = attention_like_scores(rng, n), attention_like_scores(rng, n)
    kept = hiprune.select(torch.from_numpy(score_obj)[None], torch.from_numpy(score_deep)[None], keep, grid)
    np.testing.assert_array_equal(kept[0].numpy(), reference_hiprune(score_obj, score_deep, keep, grid[1]))


CORNERS_24 = [[0], [23], [552], [575], [24], [47], [0, 1, 23, 575], [24, 23, 47, 48], [551, 552, 575, 574]]


@pytest.mark.parametrize("peaks", CORNERS_24)
@pytest.mark.parametrize("keep", [64, 128, 192])
def test_hiprune_anchor_neighbourhoods_at_grid_corners_and_row_edges(peaks: list[int], keep: int) -> None:
    rng = np.random.default_rng(sum(peaks) + keep)
    score_obj = attention_like_scores(rng, 576, peaks)
    score_deep = attention_like_scores(rng, 576, peaks[::-1])  # anchors also strong in the deep layer
    kept = hiprune.select(torch.from_numpy(score_obj)[None], torch.from_numpy(score_deep)[None], keep, 24)
    np.testing.assert_array_equal(kept[0].numpy(), reference_hiprune(score_obj, score_deep, keep, 24))
    assert kept.shape == (1, keep)


def test_hiprune_neighbours_wrap_rows_and_clamp_like_the_reference() -> None:
    score_obj = torch.zeros(1, 576)
    score_obj[0, 24] = 1.0  # column 0 of row 1: a-1 = 23 is the end of row 0 (raster wrap)
    mask = hiprune.anchor_buffer_mask(score_obj, keep=25, grid=24, alpha=0.2)  # k_a = 1
    assert np.flatnonzero(mask[0].numpy()).tolist() == [0, 23, 24, 25, 48]
    score_obj = torch.zeros(1, 576)
    score_obj[0, 575] = 1.0  # last patch: a+1 and a+24 clamp to 575
    mask = hiprune.anchor_buffer_mask(score_obj, keep=25, grid=24, alpha=0.2)
    assert np.flatnonzero(mask[0].numpy()).tolist() == [551, 574, 575]


def test_hiprune_ties_break_to_lower_index() -> None:
    score_deep = torch.full((1, 64), 0.5)
    kept = hiprune.select(torch.zeros(1, 64), score_deep, keep=10, grid=8)  # k_a = 0: pure deep top-10
    assert kept[0].tolist() == list(range(10))


def test_hiprune_budget_rules() -> None:
    assert [hiprune.anchor_count(k) for k in (192, 128, 64, 16)] == [4, 3, 1, 0]
    assert hiprune.anchor_count(25) == 0  # round(0.5) == 0: half to even, as Python's round
    with pytest.raises(ValueError, match="lower alpha"):
        hiprune.select(torch.rand(1, 64), torch.rand(1, 64), keep=4, grid=8, alpha=1.0)
    with pytest.raises(ValueError, match="does not match"):
        hiprune.select(torch.rand(1, 64), torch.rand(1, 64), keep=4, grid=(7, 9))
    assert [hiprune.default_object_layer(d) for d in (24, 12, 4, 1)] == [9, 4, 2, 1]


def test_hiprune_batched_selection_is_per_image() -> None:
    rng = np.random.default_rng(3)
    obj = np.stack([attention_like_scores(rng, 256) for _ in range(3)])
    deep = np.stack([attention_like_scores(rng, 256) for _ in range(3)])
    kept = hiprune.select(torch.from_numpy(obj), torch.from_numpy(deep), 40, 16)
    for b in range(3):
        np.testing.assert_array_equal(kept[b].numpy(), reference_hiprune(obj[b], deep[b], 40, 16))


def reference_qwen_reduce(attn: np.ndarray, reverse_indices: np.ndarray) -> np.ndarray:
    heads, tokens, _ = attn.shape
    received = np.zeros(tokens)
    for h in range(heads):
        for i in range(tokens):
            received += attn[h, i] / heads
    merged = np.array([received[4 * j : 4 * j + 4].mean() for j in range(tokens // 4)])
    return merged[reverse_indices]


def test_qwen_reduction_matches_loop() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 64, 64)).astype(np.float32)
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    reverse = rng.permutation(16)
    reduced = hiprune.qwen_reduce(torch.from_numpy(attn), torch.from_numpy(reverse))
    np.testing.assert_allclose(reduced.numpy(), reference_qwen_reduce(attn, reverse), rtol=1e-5)


def test_qwen_duplicate_quirk_reference_keeps_fewer_static_fills() -> None:
    # deep values are column sums (mean 1): an anchor with a large deep value is re-picked as a register
    n = 14 * 14
    shallow = torch.zeros(n)
    shallow[100] = 5.0
    deep = torch.linspace(0.5, 1.5, n)
    deep[100] = 9.0  # 9 - 1 = 8: still the largest, picked again
    reference = hiprune.qwen_select_reference(shallow, deep, 0.334, (1, 28, 28))
    static = hiprune.qwen_select(shallow, deep, 0.334, (1, 28, 28))
    budget = hiprune.qwen_budget(n, 0.334)
    assert len(reference) == budget - 1 and len(static) == budget
    assert set(reference.tolist()) < set(static.tolist())


def reference_divprune_order(embeds: np.ndarray, keep: int) -> list[int]:
    x = torch.from_numpy(embeds).float()
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T
    distance = (distance + distance.T) / 2
    selected: list[int] = []
    for i in range(keep):
        if i == 0:
            score = torch.topk(distance, 2, dim=0, largest=False).values[1]
        else:
            score = distance[selected].min(dim=0).values
        selected.append(int(torch.argmax(score)))
    return selected


@pytest.mark.parametrize("seed", range(1, 5))
@pytest.mark.parametrize("keep", [8, 32, 100])
def test_divprune_matches_reference_loop_other_seeds(seed: int, keep: int) -> None:
    embeds = np.random.default_rng(seed).standard_normal((144, 48)).astype(np.float32)
    order = divprune.greedy_order(torch.from_numpy(embeds)[None], keep)[0].tolist()
    assert order == reference_divprune_order(embeds, keep)
    assert divprune.select(torch.from_numpy(embeds)[None], keep)[0].tolist() == sorted(order)


def test_divprune_never_repeats_a_token_even_with_duplicate_embeddings() -> None:
    base = torch.randn(4, 16)
    embeds = base.repeat(5, 1)[None]  # 20 tokens, 4 distinct directions
    kept = divprune.select(embeds, 10)[0].tolist()
    assert len(set(kept)) == 10 and kept == sorted(kept)


def test_fastv_scores_and_selection() -> None:
    attn = torch.softmax(torch.randn(1, 4, 30, 30), dim=-1)
    image_scores = fastv.scores(attn, image_start=2, num_image=20)
    assert torch.allclose(image_scores, attn[:, :, -1, 2:22].mean(1))
    keep = fastv.keep_count(20, 0.75)
    assert keep == 5
    kept = fastv.select(image_scores, keep)
    assert kept[0].tolist() == sorted(torch.argsort(-image_scores[0], stable=True)[:keep].tolist())


def test_baselines_are_static_and_seeded() -> None:
    assert uniform.indices(576, 64).tolist() == [i * 9 for i in range(64)]
    assert torch.equal(random.priority(100, seed=1), random.priority(100, seed=1))
    assert not torch.equal(random.priority(100, seed=1), random.priority(100, seed=2))
    assert sorted(random.priority(100, seed=1).tolist()) == list(range(100))  # a permutation: no ties


def test_functional_apis_accept_unbatched_inputs_and_numpy() -> None:
    rng = np.random.default_rng(11)
    obj, deep = attention_like_scores(rng, 576), attention_like_scores(rng, 576)
    kept = hiprune.select(obj, deep, 64, 24)  # numpy (N,) in, (keep,) out
    assert kept.shape == (64,)
    np.testing.assert_array_equal(kept.numpy(), reference_hiprune(obj, deep, 64, 24))
    attn = torch.softmax(torch.randn(4, 17, 17), dim=-1)
    torch.testing.assert_close(hiprune.scores(attn), hiprune.scores(attn[None])[0])
    embeds = rng.standard_normal((50, 8)).astype(np.float32)
    assert divprune.select(embeds, 5).shape == (5,)
    assert divprune.greedy_order(embeds, 5).tolist() == reference_divprune_order(embeds, 5)
    with pytest.raises(ValueError, match="batched"):
        hiprune.select(torch.rand(2, 3, 64), torch.rand(2, 3, 64), 8, 8)
