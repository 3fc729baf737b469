"""VLA-Pruner's static-shape implementation against an eager port of the reference algorithm (spec §2.2-§2.9).

The golden file pins one episode (seed 0). This test replays other seeded episodes, both score criteria, keep
128/64/32 and both guide dtypes (float32, and the reference's explicit bfloat16 cast, with bf16-valued inputs
so that exact ties occur) through two implementations side by side: the project's `vla_pruner` API (a 256-wide
candidate mask and a fixed-length greedy) and a plain numpy oracle that follows the reference line by line
(a deque of numpy vectors, lexsort top-K, `unique(cat(...))`, a data-dependent greedy on the union in float64).
Kept sets, guides and history vectors must agree at every step, including a bf16 tie at the top-K boundary of
the guide, which the reference's tie rule (value desc, index asc) resolves to the lower index.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tpc.methods import vla_pruner

NUM_IMAGE = 256
IMAGE_START = 1
NUM_TEXT = 20
HEADS = 4
DIM = 32
ACTIONS = 7
STEPS = 8
WINDOW = 3
DECAY = 0.8
GUIDE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- the oracle


def to_bf16_values(array: np.ndarray) -> np.ndarray:
    """float32 array of the nearest bfloat16 values (round to nearest even, as torch casts)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def oracle_topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-k, ties by (value desc, index asc): a stable sort on (-value, index)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.lexsort((np.arange(values.size), -values))
    return order[:k]


def oracle_current_scores(attn: np.ndarray, criterion: str) -> np.ndarray:
    """(H, L, L) layer-2 attention -> (256,): head mean, then all rows ("prefill") or the last row ("last")."""
    average = attn.astype(np.float32).mean(axis=0)
    current = average.mean(axis=0) if criterion == "prefill" else average[-1]
    return current[IMAGE_START : IMAGE_START + NUM_IMAGE]


def oracle_guide(history: deque, decay: float, bf16: bool) -> np.ndarray | None:
    """The main-branch temporal guide (§2.4): oldest-heaviest weights, normalised by the vector sum."""
    if len(history) < history.maxlen:
        return None
    w = np.array([decay**i for i in range(len(history) - 1, -1, -1)], dtype=np.float32)
    guided = sum(w[i] * history[-1 - i] for i in range(len(history)))
    guided = guided / guided.sum()
    if bf16:
        return torch.tensor(guided, dtype=torch.bfloat16).float().numpy()
    return guided.astype(np.float32)


def oracle_greedy(embeds: np.ndarray, union: np.ndarray, keep: int) -> np.ndarray:
    """DivPrune's max-min greedy on the union (§2.5), in float64; picked candidates are excluded."""
    x = embeds[union].astype(np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = 1.0 - xn @ xn.T
    c = (c + c.T) / 2
    picks: list[int] = []
    for i in range(keep):
        if i == 0:
            score = np.sort(c, axis=0)[1]  # 2nd smallest of each column: distance to the nearest other candidate
        else:
            score = c[picks].min(axis=0)
            score[picks] = -np.inf
        picks.append(int(np.argmax(score)))
    return union[np.array(picks)]


def oracle_select(current: np.ndarray, guide: np.ndarray | None, embeds: np.ndarray, keep: int) -> np.ndarray:
    """Kept image indices, ascending; warm-up (no guide) keeps every token."""
    if guide is None:
        return np.arange(NUM_IMAGE)
    union = np.unique(np.concatenate([oracle_topk(guide, keep), oracle_topk(current, keep)]))
    if union.size > keep:
        return np.sort(oracle_greedy(embeds, union, keep))
    return union


def oracle_action_importance(rows: list[np.ndarray], kept: np.ndarray) -> np.ndarray:
    """Scatter the image columns of the 7 action rows back to the 256 grid (zeros where pruned), then the mean
    over the heads and over the action tokens, as the reference's `[15].float().mean(dim=0).mean(dim=0)`."""
    full = np.zeros((HEADS, len(rows), NUM_IMAGE), dtype=np.float32)
    for a, row in enumerate(rows):
        full[:, a, kept] = row[:, IMAGE_START : IMAGE_START + kept.size]
    return full.mean(axis=0).mean(axis=0)


# -------------------------------------------------------------------------------------------- the episodes


@dataclass
class Step:
    attn: np.ndarray  # (H, L, L) layer-2 attention over the full sequence
    embeds: np.ndarray  # (256, D) LLM input embeddings of the image tokens
    rows: list[np.ndarray]  # 7 action rows, each (H, L_kept + a)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=2)
def make_episode(seed: int, keep: int, bf16: bool) -> tuple[Step, ...]:
    """8 steps of random inputs (cached for the next test, which replays it with the other criterion; treat it
    as read-only).
    Attention rows are causal softmaxes (image scores near 1/L), embeddings Gaussian; with `bf16` every input
    is rounded to bf16 values, as the reference's tensors are."""
    rng = np.random.default_rng(seed)
    length = 1 + NUM_IMAGE + NUM_TEXT
    causal = np.tril(np.ones((length, length), dtype=bool))
    steps = []
    for t in range(STEPS):
        logits = rng.standard_normal((HEADS, length, length), dtype=np.float32) * np.float32(0.5)
        attn = softmax(np.where(causal, logits, np.float32(-np.inf)))
        embeds = rng.standard_normal((NUM_IMAGE, DIM), dtype=np.float32)
        kept_len = 1 + (NUM_IMAGE if t < WINDOW else keep) + NUM_TEXT
        rows = [softmax(rng.standard_normal((HEADS, kept_len + a), dtype=np.float32)) for a in range(ACTIONS)]
        if bf16:
            attn, embeds, rows = to_bf16_values(attn), to_bf16_values(embeds), [to_bf16_values(r) for r in rows]
        steps.append(Step(attn, embeds, rows))
    return tuple(steps)


def current_for_selection(attn: np.ndarray, criterion: str, bf16: bool) -> np.ndarray:
    """The score vector both sides select on: the oracle's, rounded to bf16 values in the bf16 case (the
    reference's means are bf16 tensors), which makes exact ties common."""
    current = oracle_current_scores(attn, criterion)
    return to_bf16_values(current) if bf16 else current


class GuideMismatch(AssertionError):
    """The bf16 guide differs from the oracle's (everything else in the episode agreed)."""


def replay(steps: Sequence[Step], criterion: str, keep: int, dtype_name: str) -> list[np.ndarray]:
    """Run the oracle and the project side by side; assert agreement at every step; return the kept sets."""
    bf16 = dtype_name == "bfloat16"
    oracle_history: deque = deque(maxlen=WINDOW)
    history = vla_pruner.History(num_tokens=NUM_IMAGE, window=WINDOW, decay=DECAY, guide_dtype=GUIDE_DTYPES[dtype_name])
    kept_sets, guide_mismatches = [], []
    for t, step in enumerate(steps):
        attn = torch.from_numpy(step.attn)[None]
        np.testing.assert_allclose(
            vla_pruner.semantic_scores(attn, IMAGE_START, NUM_IMAGE, criterion)[0].numpy(),
            oracle_current_scores(step.attn, criterion),
            rtol=1e-5,
            atol=1e-9,
            err_msg=f"current scores, step {t}",
        )
        current = current_for_selection(step.attn, criterion, bf16)

        expected_guide = oracle_guide(oracle_history, DECAY, bf16)
        guide = history.guide()
        if expected_guide is None:
            assert guide is None, f"step {t}: guide before the history is full"
        else:
            assert guide is not None and guide.dtype == GUIDE_DTYPES[dtype_name], f"step {t}: guide {guide!r}"
            if bf16:  # exact; collected, so that the kept sets and history are still checked to the end
                differ = np.flatnonzero(guide.float().numpy() != expected_guide)
                guide_mismatches += [
                    f"step {t} token {i}: {guide[i].item()!r} != {expected_guide[i]!r}" for i in differ.tolist()
                ]
            else:
                np.testing.assert_allclose(guide.numpy(), expected_guide, rtol=1e-6, err_msg=f"guide, step {t}")

        expected_kept = oracle_select(current, expected_guide, step.embeds, keep)
        kept = vla_pruner.select(torch.from_numpy(current), guide, torch.from_numpy(step.embeds), keep)
        np.testing.assert_array_equal(kept.numpy(), expected_kept, err_msg=f"kept set, step {t}")
        kept_sets.append(expected_kept)

        rows = [torch.from_numpy(r) for r in step.rows]
        vector = vla_pruner.action_importance(rows, kept, image_start=IMAGE_START, num_image=NUM_IMAGE)
        oracle_history.append(oracle_action_importance(step.rows, expected_kept))
        history.push(vector)
        assert len(history) == len(oracle_history)
        for got, want in zip(history.vectors, oracle_history, strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-12, err_msg=f"history, step {t}")
    if guide_mismatches:
        raise GuideMismatch("bf16 guide differs from the reference: " + "; ".join(guide_mismatches))
    return kept_sets


# ------------------------------------------------------------------------------------------------ the tests


# Seed 10, prefill, keep 128 is pinned on purpose: at step 4, token 160, the guide normalised by numpy's float32
# `np.sum` (pairwise order) is 0.0029525755, one ulp below the bf16 rounding midpoint 0.00295257568359375, while
# torch's own reduction order lands on the midpoint itself and would round up. `vla_pruner.pairwise_sum`
# reproduces numpy's order, so the bf16 guide is exact here too.
EPISODES = [
    (seed, criterion, keep, dtype_name)
    for seed in range(1, 7)
    for keep in (128, 64, 32)
    for dtype_name in GUIDE_DTYPES
    for criterion in vla_pruner.CRITERIA  # innermost: consecutive tests share the cached episode
] + [(10, "prefill", 128, "bfloat16")]


@pytest.mark.parametrize(("seed", "criterion", "keep", "dtype_name"), EPISODES)
def test_episode_matches_the_reference(seed: int, criterion: str, keep: int, dtype_name: str) -> None:
    kept_sets = replay(make_episode(seed, keep, dtype_name == "bfloat16"), criterion, keep, dtype_name)
    assert [k.size for k in kept_sets] == [NUM_IMAGE] * WINDOW + [keep] * (STEPS - WINDOW)


def tie_episode(keep: int, exact_in_float32: bool) -> tuple[list[Step], int, int]:
    """An episode whose first guide (step 3) ties at ranks keep-1 and keep in bf16: the three warm-up action
    rows all carry the same image-column profile v, so the guide is v up to one normalisation. Returns the
    steps and the two tied tokens (lower, higher). With `exact_in_float32` the two values are equal already in
    float32; otherwise the higher token is 2**-12 larger, a difference that only the bf16 cast erases."""
    rng = np.random.default_rng(100 + keep)
    steps = [Step(s.attn, s.embeds, list(s.rows)) for s in make_episode(200 + keep, keep, bf16=True)]
    # distinct values 1% apart (more than one bf16 step, so no other bf16 ties), shuffled over the tokens
    v = (1.01 ** rng.permutation(NUM_IMAGE)).astype(np.float32)
    v /= v.sum()
    order = oracle_topk(v, NUM_IMAGE)
    # the tokens at ranks keep-1 and keep become the tied pair; its higher index is ahead in float32
    lower, higher = sorted(int(i) for i in order[keep - 1 : keep + 1])
    centre = to_bf16_values(v[lower : lower + 1])[0]  # a bf16 value: small perturbations round back to it
    v[lower] = centre
    v[higher] = centre if exact_in_float32 else np.float32(centre * (1 + 2.0**-12))
    for t in range(WINDOW):
        for a, row in enumerate(steps[t].rows):
            row = row.copy()
            row[:, IMAGE_START : IMAGE_START + NUM_IMAGE] = v
            steps[t].rows[a] = row
    return steps, lower, higher


@pytest.mark.parametrize("exact_in_float32", [True, False])
@pytest.mark.parametrize("keep", [128, 64, 32])
def test_bf16_guide_tie_at_the_topk_boundary_keeps_the_lower_index(keep: int, exact_in_float32: bool) -> None:
    steps, lower, higher = tie_episode(keep, exact_in_float32)
    history: deque = deque(maxlen=WINDOW)
    for t in range(WINDOW):
        history.append(oracle_action_importance(steps[t].rows, np.arange(NUM_IMAGE)))
    guide_bf16 = oracle_guide(history, DECAY, bf16=True)
    guide_f32 = oracle_guide(history, DECAY, bf16=False)
    # preconditions: a bf16 tie straddling the boundary; in float32 an exact tie or the higher index ahead
    ranked = oracle_topk(guide_bf16, NUM_IMAGE)
    assert guide_bf16[lower] == guide_bf16[higher]
    assert sorted(ranked[keep - 1 : keep + 1].tolist()) == [lower, higher]
    assert (guide_f32[lower] == guide_f32[higher]) == exact_in_float32
    assert guide_f32[higher] >= guide_f32[lower]
    top_bf16 = oracle_topk(guide_bf16, keep).tolist()
    assert lower in top_bf16 and higher not in top_bf16  # the oracle's rule: the lower index wins

    # the project's candidate mask takes the lower index, not the higher one
    current = np.zeros(NUM_IMAGE, dtype=np.float32)
    current[top_bf16] = 1.0  # current top-keep = the guide's top-keep: the union has exactly keep tokens
    project_guide = vla_pruner.History(NUM_IMAGE, WINDOW, DECAY, guide_dtype=torch.bfloat16)
    for vector in history:
        project_guide.push(torch.from_numpy(vector))
    guide = project_guide.guide()
    np.testing.assert_array_equal(guide.float().numpy(), guide_bf16)
    mask = vla_pruner.candidates(torch.from_numpy(current), guide, keep)
    assert bool(mask[lower]) and not bool(mask[higher])
    assert int(mask.sum()) == keep
    kept = vla_pruner.select(torch.from_numpy(current), guide, torch.from_numpy(steps[WINDOW].embeds), keep)
    assert lower in kept.tolist() and higher not in kept.tolist()
    np.testing.assert_array_equal(kept.numpy(), np.sort(top_bf16))

    # and the whole episode, with the tie in the first guide, agrees with the oracle in both guide dtypes
    for dtype_name in GUIDE_DTYPES:
        replay(steps, "prefill", keep, dtype_name)


@pytest.mark.parametrize("window", [2, 3, 5])
@pytest.mark.parametrize("dtype_name", list(GUIDE_DTYPES))
def test_newest_heaviest_guide_matches_the_oft_reference(window: int, dtype_name: str) -> None:
    """§2.9: w_i = decay**i zipped with reversed(av_hist) (newest 1.0, then 0.8, 0.64, ...), divided by the
    weight sum, cast to the guide dtype; None until the deque is full; the ring keeps the last `window`."""
    rng = np.random.default_rng(window)
    oracle_history: deque = deque(maxlen=window)
    history = vla_pruner.History(
        NUM_IMAGE, window, DECAY, order="newest-heaviest", guide_dtype=GUIDE_DTYPES[dtype_name]
    )
    for _ in range(window + 3):
        vector = rng.random(NUM_IMAGE, dtype=np.float32) * (rng.random(NUM_IMAGE) > 0.3)
        oracle_history.append(vector.astype(np.float32))
        history.push(torch.from_numpy(vector))
        guide = history.guide()
        if len(oracle_history) < window:
            assert guide is None
            continue
        weights = [np.float32(DECAY**i) for i in range(len(oracle_history))]
        guided = sum(w * v for w, v in zip(weights, reversed(oracle_history), strict=True)) / sum(weights)
        expected = torch.tensor(guided, dtype=GUIDE_DTYPES[dtype_name])
        assert guide is not None and guide.dtype == expected.dtype
        torch.testing.assert_close(guide.float(), expected.float(), rtol=1e-6 if dtype_name == "float32" else 0, atol=0)


@pytest.mark.parametrize("count", [1, 7, 8, 13, 128, 129, 256, 300, 1000])
def test_pairwise_sum_is_numpys_float32_sum(count: int) -> None:
    rng = np.random.default_rng(count)
    values = (rng.random((50, count)) * rng.choice([1e-3, 1.0, 1e3], size=(50, 1))).astype(np.float32)
    got = vla_pruner.pairwise_sum(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(got, np.sum(values, axis=-1))
