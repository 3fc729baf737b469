"""CATP's and LVLM_CSP's pure functions against cases worked by hand and an independent pure-Python greedy.

The expected values are computed in the comments (or by small literal arithmetic here), never copied from a run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tpc.methods import catp, lvlm_csp
from tpc.methods import random as random_baseline

# --- CATP stage 1 ------------------------------------------------------------------------------------------------

# Six 2-D tokens whose pairwise cosines are simple: sim^ = (cos + 1) / 2.
#   t0 (1,0)  t1 (0,1)  t2 (3,4)/5  t3 (4,3)/5  t4 (-1,0)  t5 (3,-4)/5
# e.g. cos(t2, t3) = (12 + 12) / 25 = .96 -> .98; cos(t2, t5) = (9 - 16) / 25 = -.28 -> .36; cos(t0, t4) = -1 -> 0.
IMAGE = [[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [4.0, 3.0], [-1.0, 0.0], [3.0, -4.0]]
SIM_HAT = [
    [1.0, 0.5, 0.8, 0.9, 0.0, 0.8],
    [0.5, 1.0, 0.9, 0.8, 0.5, 0.1],
    [0.8, 0.9, 1.0, 0.98, 0.2, 0.36],
    [0.9, 0.8, 0.98, 1.0, 0.1, 0.5],
    [0.0, 0.5, 0.2, 0.1, 1.0, 0.2],
    [0.8, 0.1, 0.36, 0.5, 0.2, 1.0],
]
# Text tokens whose mean (0, 4/3) points along t1: the alignment sim^(t, text mean) is column t1 of SIM_HAT.
TEXT = [[0.0, 2.0], [1.0, 1.0], [-1.0, 1.0]]


def test_similarity_is_the_rescaled_cosine() -> None:
    got = catp.similarity(torch.tensor(IMAGE), torch.tensor(IMAGE))
    torch.testing.assert_close(got, torch.tensor(SIM_HAT))
    assert got.dtype == torch.float32


def test_stage1_worked_example_without_alignment() -> None:
    """lambda1 = 0: pure facility location, coverage starting at 0.

    Step 1, gain = row sums: t0 4.0, t1 3.8, t2 4.24, t3 4.28, t4 2.0, t5 2.96 -> t3; cover = [.9 .8 .98 1 .1 .5].
    Step 2: t0 (1-.9)+(.8-.5) = .4, t1 (1-.8)+(.5-.1) = .6, t2 .1+.02+.1 = .22, t4 1-.1 = .9, t5 .1+.5 = .6 -> t4;
            cover = [.9 .8 .98 1 1 .5].
    Step 3: t0 .1+.3 = .4, t1 .2, t2 .1+.02 = .12, t5 1-.5 = .5 -> t5.
    """
    image, text = torch.tensor(IMAGE), torch.tensor(TEXT)
    assert catp.stage1_order(image, text, 3, lambda1=0.0).tolist() == [3, 4, 5]
    assert catp.stage1(image, text, 3, lambda1=0.0).tolist() == [3, 4, 5]


def test_stage1_worked_example_with_alignment() -> None:
    """lambda1 = 0.7, alignment = column t1 = [.5 1 .9 .8 .5 .1], bonus = [.35 .7 .63 .56 .35 .07].

    Step 1: t0 4.35, t1 4.5, t2 4.87, t3 4.84, t4 2.35, t5 3.03 -> t2; cover = [.8 .9 1 .98 .2 .36].
    Step 2: t0 (1-.8)+(.8-.36) +.35 = .99, t1 (1-.9)+(.5-.2) +.7 = 1.1, t3 .1+.02+.14 +.56 = .82,
            t4 1-.2 +.35 = 1.15, t5 1-.36 +.07 = .71 -> t4; cover = [.8 .9 1 .98 1 .36].
    Step 3: t0 .64+.35 = .99, t1 .1+.7 = .8, t3 .26+.56 = .82, t5 .64+.07 = .71 -> t0.
    Pick order [2, 4, 0]; kept, ascending: [0, 2, 4].
    """
    image, text = torch.tensor(IMAGE), torch.tensor(TEXT)
    assert catp.stage1_order(image, text, 3).tolist() == [2, 4, 0]  # lambda1 defaults to 0.7
    assert catp.stage1(image, text, 3, lambda1=0.7).tolist() == [0, 2, 4]
    # priority: keep - rank at the picks, 0 elsewhere
    assert catp.stage1_priority(image, text, 3).tolist() == [1.0, 0.0, 3.0, 0.0, 2.0, 0.0]


def test_lambda1_changes_the_first_pick() -> None:
    """First step, row sum + lambda1 * alignment: lambda1 = 0 -> t3 (4.28); 0.7 -> t2 (4.87 over t3's 4.84);
    10 -> t1 (3.8 + 10 = 13.8 over t2's 4.24 + 9 = 13.24)."""
    image, text = torch.tensor(IMAGE), torch.tensor(TEXT)
    assert [int(catp.stage1_order(image, text, 1, lam)[0]) for lam in (0.0, 0.7, 10.0)] == [3, 2, 1]


def test_stage1_ties_go_to_the_lower_index() -> None:
    """t0 (1,0), t1 (1,1), t2 (0,1), t3 (1,1) = t1; lambda1 = 0; s = sim^(45 deg) = (1 + 1/sqrt2) / 2 = .854.

    Step 1: t1 and t3 both sum to s + 1 + s + 1, an exact tie -> t1 (lower). cover = [s 1 s 1].
    Step 2: t0 1 - s, t2 1 - s (exact tie: one positive term each), t3 0 -> t0. Step 3: t2 (1 - s) over t3 (0).
    """
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0]])
    assert catp.stage1_order(image, text, 3, lambda1=0.0).tolist() == [1, 0, 2]
    assert catp.stage1(image, text, 3, lambda1=0.0).tolist() == [0, 1, 2]
    # four orthonormal tokens, text along their sum: every step an exact tie -> raster order
    basis = torch.eye(4)
    assert catp.stage1_order(basis, torch.ones(1, 4), 4).tolist() == [0, 1, 2, 3]


def _reference_greedy(image: list[list[float]], text: list[list[float]], keep: int, lambda1: float) -> list[int]:
    """Stage 1 straight from the formula, in Python floats; also asserts that every pick wins by a margin that
    float32 cannot reverse, so that comparing with the float32 implementation is meaningful."""

    def unit(v: list[float]) -> list[float]:
        norm = max(math.sqrt(sum(x * x for x in v)), 1e-12)
        return [x / norm for x in v]

    def sim_hat(a: list[float], b: list[float]) -> float:
        return (sum(x * y for x, y in zip(unit(a), unit(b), strict=True)) + 1) / 2

    mean = [sum(column) / len(text) for column in zip(*text, strict=True)]
    size = len(image)
    sim = [[sim_hat(image[c], image[x]) for x in range(size)] for c in range(size)]
    align = [sim_hat(image[c], mean) for c in range(size)]
    cover = [0.0] * size
    picks: list[int] = []
    for _ in range(keep):
        gains = {
            c: sum(max(0.0, sim[c][x] - cover[x]) for x in range(size)) + lambda1 * align[c]
            for c in range(size)
            if c not in picks
        }
        best = max(gains, key=lambda c: (gains[c], -c))
        runner_up = max((g for c, g in gains.items() if c != best), default=-math.inf)
        assert gains[best] - runner_up > 1e-4, "near-tie: pick another seed"
        picks.append(best)
        cover = [max(cover[x], sim[best][x]) for x in range(size)]
    return picks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("keep", [1, 4, 7, 12])
def test_stage1_matches_a_pure_python_greedy(seed: int, keep: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 12, 5, generator=generator)
    text = torch.randn(2, 3, 5, generator=generator)
    # lambda1 > 0: with lambda1 = 0, once two tokens c, d are the only uncovered ones their gains are both
    # 1 + sim^[c, d] - cover[c] - cover[d], an exact tie that float32 sums need not reproduce (lambda1 = 0 is
    # covered by the worked examples above)
    lambda1 = [0.3, 0.7, 1.5, 3.0][seed]
    order = catp.stage1_order(image, text, keep, lambda1)
    kept = catp.stage1(image, text, keep, lambda1)
    for b in range(2):
        expected = _reference_greedy(image[b].tolist(), text[b].tolist(), keep, lambda1)
        assert order[b].tolist() == expected
        assert kept[b].tolist() == sorted(expected)
    assert kept.dtype == torch.int64


def test_stage1_rejects_a_bad_budget() -> None:
    image, text = torch.tensor(IMAGE), torch.tensor(TEXT)
    for keep in (0, 7):
        with pytest.raises(ValueError, match=r"keep must be in \[1, 6\]"):
            catp.stage1(image, text, keep)


# --- CATP stage 2 ------------------------------------------------------------------------------------------------


def test_context_scores_by_hand() -> None:
    """growth = max(0, cur - prev) = [.3, 0 (-.2 clamped), 0]; query mean = mean((1,1), (1,-1)) = (1, 0);
    plain cosines: (2,0) -> 1, (0,3) -> 0, (-3,4) -> -.6; lambda2 = .6 -> [.3 + .6, 0, -.36]."""
    prev = torch.tensor([[0.2, 0.5, 0.1]])
    cur = torch.tensor([[0.5, 0.3, 0.1]])
    context = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-3.0, 4.0]]])
    query = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])
    torch.testing.assert_close(catp.context_scores(prev, cur, context, query), torch.tensor([[0.9, 0.0, -0.36]]))
    # lambda2 = 1: [.3 + 1, 0, -.6]
    torch.testing.assert_close(
        catp.context_scores(prev, cur, context, query, lambda2=1.0), torch.tensor([[1.3, 0.0, -0.6]])
    )


def test_query_scores_by_hand() -> None:
    """kept context mean = mean((6,0), (0,8)) = (3,4) -> unit (.6,.8); plain cosines of (1,0), (0,2), (-4,3),
    (-3,-4): .6, .8, (-12 + 12)/25 = 0, -1."""
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-4.0, 3.0], [-3.0, -4.0]]])
    context = torch.tensor([[[6.0, 0.0], [0.0, 8.0]]])
    torch.testing.assert_close(catp.query_scores(query, context), torch.tensor([[0.6, 0.8, 0.0, -1.0]]))


def test_select_prefers_higher_then_lower_index() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    # .9 at 1 and 3; then the .5 tie between 0 and 2 goes to 0
    assert catp.select(scores, 3).tolist() == [[0, 1, 3]]
    assert catp.select(scores, 2).tolist() == [[1, 3]]
    assert catp.select(scores[0], 4).tolist() == [0, 1, 2, 3]


def test_masked_mean_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], [[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    got = catp.masked_mean(hidden, mask)
    # rows 0 and 2: ((1 + 5) / 2, (2 + 7) / 2) = (3, 4.5); an empty mask gives zeros
    torch.testing.assert_close(got, torch.tensor([[[3.0, 4.5]], [[0.0, 0.0]]]))
    assert got.shape == (2, 1, 2)
    assert catp.masked_mean(hidden[0].to(torch.bfloat16), mask[0]).dtype == torch.float32


def test_unbatched_and_numpy_inputs_match_batched() -> None:
    generator = torch.Generator().manual_seed(7)
    image, text = torch.randn(2, 9, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    prev, cur = torch.rand(2, 9, generator=generator), torch.rand(2, 9, generator=generator)
    mask = torch.rand(2, 9, generator=generator) > 0.5
    for b in range(2):
        img, txt = image[b].numpy(), text[b].numpy()
        assert torch.equal(catp.stage1(img, txt, 4), catp.stage1(image, text, 4)[b])
        assert torch.equal(catp.stage1_order(img, txt, 4), catp.stage1_order(image, text, 4)[b])
        torch.testing.assert_close(catp.similarity(img, txt), catp.similarity(image, text)[b])
        torch.testing.assert_close(
            catp.context_scores(prev[b].numpy(), cur[b].numpy(), img, txt),
            catp.context_scores(prev, cur, image, text)[b],
        )
        torch.testing.assert_close(catp.query_scores(img, txt), catp.query_scores(image, text)[b])
        assert torch.equal(catp.select(cur[b].numpy(), 3), catp.select(cur, 3)[b])
        torch.testing.assert_close(catp.masked_mean(img, mask[b].numpy()), catp.masked_mean(image, mask)[b])
        rep = np.array([0, 4, 8])
        assert torch.equal(
            lvlm_csp.nearest_representative(img, rep),
            lvlm_csp.nearest_representative(image, torch.tensor([[0, 4, 8]] * 2))[b],
        )


class _Stage1(torch.nn.Module):
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return catp.stage1(image, text, 3)


def test_stage1_exports_with_static_shapes() -> None:
    generator = torch.Generator().manual_seed(11)
    example = (torch.randn(1, 8, 4, generator=generator), torch.randn(1, 2, 4, generator=generator))
    program = torch.export.export(_Stage1(), example, strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any(name in target for target in targets for name in ("nonzero", "unique", "masked_select"))
    other = (torch.randn(1, 8, 4, generator=generator), torch.randn(1, 2, 4, generator=generator))
    for inputs in (example, other):
        assert torch.equal(program.module()(*inputs), catp.stage1(*inputs, 3))
    assert not torch.equal(catp.stage1(*example, 3), catp.stage1(*other, 3))  # two inputs that pick differently


# --- LVLM_CSP ----------------------------------------------------------------------------------------------------


def test_uniform_representatives() -> None:
    # floor(16 / 5) = 3: 0, 3, 6, 9, 12
    assert lvlm_csp.representatives(16, 5).tolist() == [0, 3, 6, 9, 12]
    assert lvlm_csp.representatives(16, 5, "uniform").dtype == torch.int64
    priority = lvlm_csp.sampler_priority(16, 5, "uniform")
    assert torch.nonzero(priority).flatten().tolist() == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("seed", [0, 5])
def test_random_representatives_are_the_random_baselines_tokens(seed: int) -> None:
    # random.priority is a permutation as ranks: its top 6 of 20 are the positions holding 14..19
    permutation = np.random.default_rng(seed).permutation(20)
    expected = np.flatnonzero(permutation >= 20 - 6).tolist()
    assert lvlm_csp.representatives(20, 6, "random", seed=seed).tolist() == expected
    assert torch.equal(lvlm_csp.sampler_priority(20, 6, "random", seed=seed), random_baseline.priority(20, seed))


def test_cls_attention_representatives() -> None:
    scores = torch.tensor([0.1, 0.4, 0.3, 0.4, 0.3, 0.05])
    # .4 at 1 and 3, then the .3 tie between 2 and 4 goes to 2
    assert lvlm_csp.representatives(6, 3, "cls-attention", cls_scores=scores).tolist() == [1, 2, 3]
    batched = torch.stack([scores, scores.flip(0)])
    # flipped: [.05 .3 .4 .3 .4 .1] -> .4 at 2 and 4, then .3 at 1 (over 3)
    assert lvlm_csp.representatives(6, 3, "cls-attention", cls_scores=batched).tolist() == [[1, 2, 3], [1, 2, 4]]
    assert torch.equal(lvlm_csp.sampler_priority(6, 3, "cls-attention", cls_scores=batched), batched)


@pytest.mark.parametrize(
    ("count", "sampler", "scores", "message"),
    [
        (0, "uniform", None, r"count must be in \[1, 16\]"),
        (17, "random", None, r"count must be in \[1, 16\]"),
        (4, "kmeans", None, "uniform, random, cls-attention"),
        (4, "cls-attention", None, "needs cls_scores"),
        (4, "cls-attention", torch.zeros(15), r"cls_scores must be \(N,\) or \(B, N\)"),
    ],
)
def test_representative_errors(count: int, sampler: str, scores: torch.Tensor | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lvlm_csp.representatives(16, count, sampler, cls_scores=scores)
    with pytest.raises(ValueError, match=message):
        lvlm_csp.sampler_priority(16, count, sampler, cls_scores=scores)


# t0 (1,0), t1 (0,1), t2 (2,1), t3 (1,3), t4 (1,0) = t0.
# cos(t2, (1,0)) = 2/sqrt5 = .894 > cos(t2, (0,1)) = .447; cos(t3, (1,0)) = 1/sqrt10 = .316 < cos(t3, (0,1)) = .949.
CLUSTER = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0], [1.0, 0.0]]


def test_nearest_representative_by_hand() -> None:
    embeds = torch.tensor(CLUSTER)
    # representatives t0, t1, t4 at positions 0, 1, 2. t2 ties between positions 0 and 2 (same embedding) -> 0;
    # t4 would tie the same way, but a representative maps to itself -> 2.
    assert lvlm_csp.nearest_representative(embeds, torch.tensor([0, 1, 4])).tolist() == [0, 1, 0, 1, 2]
    # listed as t4, t1, t0: t0 is position 2 (itself), t4 position 0, t2's tie goes to position 0 (t4)
    assert lvlm_csp.nearest_representative(embeds, torch.tensor([4, 1, 0])).tolist() == [2, 1, 0, 1, 0]
    assert lvlm_csp.nearest_representative(embeds, torch.tensor([4, 1, 0])).dtype == torch.int64


def test_representative_update_by_hand() -> None:
    """Representatives t0 (1,0) and t1 (0,1); t2 (2,1) follows t0, t3 (1,3) follows t1 (cosines above).
    rep_hidden: t0 -> (1.5, .5), update (.5, .5); t1 -> (-1, 3), update (-1, 2).
    t2 -> (2,1) + (.5,.5) = (2.5, 1.5); t3 -> (1,3) + (-1,2) = (0, 5)."""
    embeds = torch.tensor(CLUSTER[:4])
    rep_hidden = torch.tensor([[1.5, 0.5], [-1.0, 3.0]])
    got = lvlm_csp.representative_update(embeds, torch.tensor([0, 1]), rep_hidden)
    torch.testing.assert_close(got, torch.tensor([[1.5, 0.5], [-1.0, 3.0], [2.5, 1.5], [0.0, 5.0]]))


def test_representative_update_keeps_rep_hidden_exactly_and_its_dtype() -> None:
    # 0.1 + (0.3 - 0.1) rounds away from 0.3 in float32 arithmetic; a representative must still get 0.3 exactly
    embeds = torch.tensor([[0.1, 0.7], [0.7, 0.1], [0.2, 0.6]])
    rep_hidden = torch.tensor([[0.3, 1e-3]], dtype=torch.float64)
    got = lvlm_csp.representative_update(embeds, torch.tensor([0]), rep_hidden)
    assert got.dtype == torch.float64
    assert torch.equal(got[0], rep_hidden[0])
    # the other two follow the only representative: their embedding + (rep_hidden - embedding of t0), in float64
    update = rep_hidden[0] - embeds[0].double()
    torch.testing.assert_close(got[1:], embeds[1:].double() + update)
    batched = lvlm_csp.representative_update(embeds[None], torch.tensor([[0]]), rep_hidden[None])
    assert torch.equal(batched[0], got)
