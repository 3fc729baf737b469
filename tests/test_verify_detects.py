"""Verification must fail when the artifact is wrong, and say which kind of wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tpc import verification as verify_module
from tpc.cli import main
from tpc.contract.manifest import file_hashes
from tpc.errors import VerificationFailed
from tpc.exporting import export
from tpc.pipeline import PruneRequest
from tpc.verification import verify


def _copy(exported: Callable[..., Path], tmp_path: Path) -> Path:
    directory = tmp_path / "copy"
    shutil.copytree(exported("zoo:tiny-clip", "hiprune", 32), directory)
    return directory


def _reseal(directory: Path) -> None:
    """Record the hashes of the edited files in tpc.json, so verification gets past its shipped-file checks."""
    data = json.loads((directory / "tpc.json").read_text())
    data["files"] = file_hashes(directory)
    (directory / "tpc.json").write_text(json.dumps(data))


def test_flipped_selection_is_diagnosed_as_a_flip(exported: Callable[..., Path], tmp_path: Path) -> None:
    directory = _copy(exported, tmp_path)
    model = onnx.load(str(directory / "model.onnx"))
    first_topk = next(node for node in model.graph.node if node.op_type == "TopK")
    largest = next(a for a in first_topk.attribute if a.name == "largest")
    largest.i = 0  # keep the *least* attended tokens
    onnx.save(model, str(directory / "model.onnx"))
    _reseal(directory)  # as a forger would: the runtime checks behind the hash check are what is tested
    report = verify(directory, samples=2)
    assert not report.passed
    assert report.kept_rows_agreeing == 0
    assert all(d.passed for d in report.teacher_forced.values())
    assert report.diagnosis.startswith("selection flip")


def test_corrupted_weights_are_diagnosed_as_a_computation_difference(exported, tmp_path: Path, capsys) -> None:
    directory = _copy(exported, tmp_path)
    model = onnx.load(str(directory / "model.onnx"))
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(largest).copy()
    weights *= 1.01
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    onnx.save(model, str(directory / "model.onnx"))
    _reseal(directory)  # as a forger would: the runtime checks behind the hash check are what is tested
    report = verify(directory, samples=2)
    assert not report.passed
    assert not all(d.passed for d in report.teacher_forced.values())
    assert "differs" in report.diagnosis or "drift" in report.diagnosis
    assert main(["verify", str(directory), "--samples", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_export_fails_and_writes_nothing_when_verification_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(
        verify_module.TOLERANCES, "fp32", verify_module.Tolerance(0.0, 0.0)
    )  # demand bit-exact floats: ORT is not
    out = tmp_path / "out"
    with pytest.raises(VerificationFailed) as failure:
        export(PruneRequest("zoo:tiny-clip", "uniform", 16), "onnx", out, samples=1)
    assert "drift" in failure.value.report.diagnosis
    assert list(tmp_path.iterdir()) == []


def test_user_inputs_are_checked_against_the_static_signature(exported, tmp_path: Path) -> None:
    directory = exported("zoo:tiny-clip", "hiprune", 32)
    good = tmp_path / "good.npz"
    np.savez(good, pixel_values=np.random.default_rng(9).standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert verify(directory, inputs_file=good).passed
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixel_values=np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(verify_module.UsageError, match=r"takes float32\[1, 3, 64, 64\] \(static shapes\)"):
        verify(directory, inputs_file=bad)
