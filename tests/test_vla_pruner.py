"""VLA-Pruner's functional API against the golden 8-step episode (docs/methods.md, shared/golden/README.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tpc.methods import vla_pruner

TRAJECTORIES = [f"{c}_r{r}" for c in ("prefill", "fastv") for r in ("0.5", "0.75", "0.875")]
CRITERION = {"prefill": "prefill", "fastv": "last"}


def bf16_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((bits.astype(np.uint32) << 16).view(np.float32))


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "vlapruner_f32_seed0.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("trajectory", TRAJECTORIES)
def test_semantic_scores_reduce_the_layer2_attention(golden: dict, trajectory: str) -> None:
    attn = bf16_bits(golden["t3_attn_layer2_bf16bits"])
    got = vla_pruner.semantic_scores(attn, 1, 256, CRITERION[trajectory.split("_")[0]])[0]
    np.testing.assert_allclose(got.numpy(), golden[f"{trajectory}_t3_current_scores"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("trajectory", TRAJECTORIES)
def test_replay_episode(golden: dict, trajectory: str) -> None:
    """All 8 steps: warm-up keeps all, then kept sets exact; guides and history vectors within rtol 1e-5."""
    keep = round(256 * (1 - float(trajectory.split("_r")[1])))
    history = vla_pruner.History(num_tokens=256, window=3, decay=0.8, guide_dtype=torch.float32)
    for t in range(int(golden["T_steps"])):
        key = f"{trajectory}_t{t}_"
        guide = history.guide()
        current = torch.from_numpy(golden[key + "current_scores"])
        if t < 3:
            assert guide is None
            embeds = torch.zeros(256, 8)
        else:
            np.testing.assert_allclose(guide.numpy(), golden[key + "guided_f32"], rtol=1e-5)
            embeds = bf16_bits(golden[f"t{t}_image_embeds_bf16bits"])
            order = golden[key + "greedy_order"]
            if order.size:  # exact pick order in float64 (one late near-tie swaps two picks in float32)
                got_order = vla_pruner.greedy_order(current[None], guide, embeds[None], keep, torch.float64)[0]
                np.testing.assert_array_equal(got_order.numpy(), order)
        kept = vla_pruner.select(current, guide, embeds, keep)
        np.testing.assert_array_equal(kept.numpy(), golden[key + "kept_image_idx"])
        rows = [torch.from_numpy(golden[f"{key}act_rows_a{a}"]) for a in range(7)]
        vector = vla_pruner.action_importance(rows, kept, image_start=1, num_image=256)
        np.testing.assert_allclose(vector.numpy(), golden[key + "av_vec"], rtol=1e-5, atol=1e-9)
        history.push(vector)


def test_history_orders_and_bf16_cast() -> None:
    vectors = [torch.full((4,), float(i + 1)) for i in range(3)]  # oldest 1, newest 3
    oldest = vla_pruner.History(4, guide_dtype=torch.float32)
    newest = vla_pruner.History(4, order="newest-heaviest", guide_dtype=torch.float32)
    for v in vectors:
        assert oldest.guide() is None
        oldest.push(v)
        newest.push(v)
    # main branch: 0.64 * newest + 0.8 * middle + 1.0 * oldest, then normalised to sum 1
    raw = 0.64 * 3 + 0.8 * 2 + 1.0 * 1
    torch.testing.assert_close(oldest.guide(), torch.full((4,), raw / (4 * raw)))
    # OFT branch: (1.0 * newest + 0.8 * middle + 0.64 * oldest) / (1 + 0.8 + 0.64)
    torch.testing.assert_close(newest.guide(), torch.full((4,), (3 + 1.6 + 0.64) / 2.44))
    assert vla_pruner.History(4).guide() is None
    cast = vla_pruner.History(4)
    for v in vectors:
        cast.push(v)
    assert cast.guide().dtype == torch.bfloat16
    cast.reset()
    assert len(cast) == 0 and cast.guide() is None


def test_union_of_identical_topk_sets_keeps_exactly_them() -> None:
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    embeds = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    kept = vla_pruner.select(scores, scores.clone(), embeds, 3)
    assert kept.tolist() == [1, 3, 5]


def test_guide_ties_break_by_lower_index() -> None:
    scores = torch.tensor([0.5, 0.1, 0.1, 0.1])
    guide = torch.tensor([0.0, 0.25, 0.25, 0.25]).to(torch.bfloat16)  # a tie at the top-2 boundary
    mask = vla_pruner.candidates(scores, guide, 2)
    assert mask.tolist() == [True, True, True, False]  # scores top-2: {0, 1}; guide top-2 of the tie: {1, 2}
