"""The static-budget select op: its tie rule in eager and in the real ONNX Runtime lowering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tpc.ops import select_tokens
from tpc.ops.lowering import lower_tpc_ops
from tpc.ops.reference import kept_indices_reference, token_select_reference

SPECIAL = [0.0, 1.0, -1.0, 0.5, np.inf, -np.inf, np.nan, 1e-30, -0.0]


def score_arrays(batch: int, tokens: int) -> st.SearchStrategy[np.ndarray]:
    """Scores drawn from a small pool (many ties) mixed with arbitrary floats, NaN and infinities."""
    element = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=True, allow_infinity=True))
    return arrays(np.float32, (batch, tokens), elements=element)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_eager_matches_kept_indices_reference(data: st.DataObject) -> None:
    batch = data.draw(st.integers(1, 3))
    tokens = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, tokens))
    scores = data.draw(score_arrays(batch, tokens))
    features = torch.randn(batch, tokens, 3)
    indices, kept = select_tokens(torch.from_numpy(scores), features, k)
    expected = kept_indices_reference(scores, k)
    assert indices.dtype == torch.int64 and indices.shape == (batch, k)
    np.testing.assert_array_equal(indices.numpy(), expected)
    assert all(len(set(row)) == k for row in indices.tolist())  # unique
    assert torch.equal(kept, features[torch.arange(batch)[:, None], indices])


class _Select(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_tokens(scores, tokens, self.k)


SHAPES = [(1, 7, 3), (2, 33, 5), (3, 64, 64)]


@pytest.fixture(scope="module")
def onnx_select(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int, int], ort.InferenceSession]:
    sessions = {}
    for batch, tokens, k in SHAPES:
        example = (torch.randn(batch, tokens), torch.randn(batch, tokens, 4))
        program = lower_tpc_ops(torch.export.export(_Select(k), example, strict=False))
        path = Path(tmp_path_factory.mktemp("select")) / "select.onnx"
        torch.onnx.export(
            program,
            example,
            str(path),
            input_names=["scores", "tokens"],
            output_names=["kept_indices", "kept_tokens"],
            dynamo=True,
        )
        sessions[(batch, tokens, k)] = ort.InferenceSession(str(path))
    return sessions


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_onnx_runtime_matches_kept_indices_reference(onnx_select: dict, data: st.DataObject) -> None:
    batch, tokens, k = data.draw(st.sampled_from(SHAPES))
    scores = data.draw(score_arrays(batch, tokens))
    features = np.random.default_rng(0).standard_normal((batch, tokens, 4)).astype(np.float32)
    indices, kept = onnx_select[(batch, tokens, k)].run(None, {"scores": scores, "tokens": features})
    want_indices, want_kept = token_select_reference(scores, features, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(kept, want_kept)


def test_lowering_is_topk_topk_gather_without_sort(tmp_path: Path) -> None:
    example = (torch.randn(2, 50), torch.randn(2, 50, 8))
    program = lower_tpc_ops(torch.export.export(_Select(10), example, strict=False))
    assert "tpc.select_tokens" not in str(program.graph)
    path = tmp_path / "m.onnx"
    torch.onnx.export(program, example, str(path), dynamo=True)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("TopK") == 2 and "Gather" in ops
    assert not {"Sort", "NonZero", "Unique"} & set(ops)


@pytest.mark.parametrize("k", [0, -1, 8])
def test_budget_out_of_range_is_a_clear_error(k: int) -> None:
    with pytest.raises(ValueError, match=r"keep must be an integer in \[1, 7\]"):
        select_tokens(torch.randn(1, 7), torch.randn(1, 7, 2), k)


def test_rejects_float64_scores_and_mismatched_tokens() -> None:
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        select_tokens(torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, 2), 2)
    with pytest.raises(ValueError, match="matching scores"):
        select_tokens(torch.randn(1, 5), torch.randn(1, 6, 2), 2)


def test_half_precision_ties_follow_the_rule() -> None:
    scores = torch.tensor([[1.0, 1.0, 2.0, float("nan"), 2.0, float("-inf")]], dtype=torch.bfloat16)
    indices, _ = select_tokens(scores, torch.zeros(1, 6, 1), 4)
    assert indices.tolist() == [[0, 1, 2, 4]]


@pytest.fixture(scope="module")
def executorch_select(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int, int], object]:
    """The op lowered as `--target executorch` lowers it (gather form, XNNPACK partitioner), one method per shape."""
    from tpc.exporter.base import ExportPart
    from tpc.exporter.executorch import ExecuTorchTarget
    from tpc.runtimes.base import Entry
    from tpc.runtimes.executorch import ExecuTorchRuntime

    where = tmp_path_factory.mktemp("select_et")
    parts = {
        f"s{batch}_{tokens}_{k}": ExportPart(
            _Select(k), {"scores": torch.randn(batch, tokens), "tokens": torch.randn(batch, tokens, 4)},
            ("kept_indices", "kept_tokens"),
        )
        for batch, tokens, k in SHAPES
    }  # fmt: skip
    artifacts = ExecuTorchTarget().export_components(parts, where, where)
    return {
        shape: ExecuTorchRuntime.load(
            where / artifacts[name].path, Entry(name, ("scores", "tokens"), ("kept_indices", "kept_tokens"))
        )
        for shape, name in zip(SHAPES, parts, strict=True)
    }  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_executorch_runtime_matches_kept_indices_reference(executorch_select: dict, data: st.DataObject) -> None:
    batch, tokens, k = data.draw(st.sampled_from(SHAPES))
    scores = data.draw(score_arrays(batch, tokens))
    features = np.random.default_rng(0).standard_normal((batch, tokens, 4)).astype(np.float32)
    out = executorch_select[(batch, tokens, k)].run({"scores": scores, "tokens": features})
    want_indices, want_kept = token_select_reference(scores, features, k)
    np.testing.assert_array_equal(out["kept_indices"], want_indices)
    np.testing.assert_array_equal(out["kept_tokens"], want_kept)
