"""`tpc eval` on the trained zoo models and real Fashion-MNIST images: eager, exported, baselines, the cache, and bad
input as one line with exit 2. The full test set runs in benchmarks/accuracy.py; here a few hundred images."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpc.cli import main
from tpc.datasets import load_dataset
from tpc.evaluation import EvalOptions, compare_exported, evaluate
from tpc.evaluation.report import MAX_DISAGREEMENT, validate
from tpc.kinds.classify import Predictions
from tpc.models_zoo import resolve

VIT, LLAVA = "zoo:fmnist-vit", "zoo:fmnist-llava"
IMAGES = 320


@pytest.fixture(scope="session")
def vit_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The issue's command, in a fresh process, on the first 320 test images: HiPrune at 98, 49, 24 of 196 tokens,
    exported to ONNX and run in ONNX Runtime."""
    out = tmp_path_factory.mktemp("eval")
    report = out / "r.json"
    command = [sys.executable, "-m", "tpc", "eval", VIT, "--dataset", "fashion-mnist", "--method", "hiprune"]
    command += ["--keeps", "98,49,24", "--target", "onnx", "--limit", str(IMAGES), "--json", str(report)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(report.read_text()), report.with_suffix(".png")


def test_sweep_reports_eager_exported_and_baselines_per_keep(vit_sweep: tuple[dict[str, Any], Path]) -> None:
    data, curve = vit_sweep
    validate(data)
    assert data["dataset"]["images"] == IMAGES and data["tokens"] == 196
    assert data["unpruned"]["accuracy"] > 0.8  # a trained model: chance is 0.1
    assert [row["keep"] for row in data["keeps"]] == [98, 49, 24]
    for row in data["keeps"]:
        assert row["eager"]["retention"] == pytest.approx(row["eager"]["accuracy"] / data["unpruned"]["accuracy"])
        exported = row["exported"]
        assert exported["target"] == "onnx"
        assert exported["agreement"] >= 1 - MAX_DISAGREEMENT and exported["within_tolerance"]
        differ = len(exported["disagreements"])
        assert abs(exported["accuracy"]["correct"] - row["eager"]["correct"]) <= differ
        random = row["random"]
        assert len(random["accuracies"]) == 3 and random["mean"] == pytest.approx(np.mean(random["accuracies"]))
        assert random["std"] == pytest.approx(np.std(random["accuracies"], ddof=1))
        assert 0.1 < row["uniform"]["accuracy"] <= 1
    # fewer tokens cost accuracy: keeping an eighth is worse than keeping half, for the method and for random
    first, last = data["keeps"][0], data["keeps"][-1]
    assert last["eager"]["accuracy"] < first["eager"]["accuracy"]
    assert last["random"]["mean"] < first["random"]["mean"]
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_to_executorch_answers_as_eager() -> None:
    """The same check in another installed runtime: the .pte run by executorch.runtime."""
    report = evaluate(EvalOptions(VIT, "fashion-mnist", "hiprune", (49,), target="executorch", limit=64, seeds=2))
    exported = report.keeps[0].exported
    assert exported is not None and exported.target == "executorch" and exported.within_tolerance
    assert exported.agreement >= 1 - MAX_DISAGREEMENT


def test_keeping_every_token_reads_the_model_as_its_own_class() -> None:
    """The head applied to all 196 kept tokens (uniform keeps them all) answers as CLIPForImageClassification's own
    forward does: the reading of kept features is the model's pooling, not an approximation of it."""
    report = evaluate(EvalOptions(VIT, "fashion-mnist", "uniform", (196,), limit=96, seeds=2))
    row = report.keeps[0]
    assert row.eager.correct == report.unpruned.correct
    assert row.uniform.correct == report.unpruned.correct
    assert row.random.accuracies == [report.unpruned.accuracy] * 2  # random keeping all is all


def test_eager_results_are_cached_per_model_and_dataset() -> None:
    options = EvalOptions(VIT, "fashion-mnist", "divprune", (49,), limit=64)
    first = evaluate(options)
    again = evaluate(options)
    assert again.cached_runs == first.cached_runs + first.computed_runs and again.computed_runs == 0
    assert again.keeps == first.keeps and again.unpruned == first.unpruned
    other = evaluate(EvalOptions(VIT, "fashion-mnist", "divprune", (49,), limit=65))  # another dataset: recomputed
    assert other.cached_runs == 0


def test_vlm_answers_with_the_class_name_eager_and_exported() -> None:
    """fmnist-llava through the whole VLM path: vision graph, prefill, the first answer token; HiPrune on the
    vision side exported to ONNX, FastV inside the decoder eager."""
    vision = evaluate(EvalOptions(LLAVA, "fashion-mnist", "hiprune", (49,), target="onnx", limit=64))
    assert vision.unpruned.accuracy > 0.7
    assert vision.keeps[0].exported is not None and vision.keeps[0].exported.within_tolerance
    decoder = evaluate(EvalOptions(LLAVA, "fashion-mnist", "fastv", (49,), limit=64))
    assert decoder.unpruned == vision.unpruned  # the same model, dataset and prompt: the cached unpruned run
    assert decoder.keeps[0].eager.accuracy > 0.5


def test_an_n_shot_prompt_for_catp() -> None:
    """CATP needs an in-context example: `--param shots=1` shows one labelled example image; its keep spans both
    images, so the baselines keep half of it per image."""
    report = evaluate(EvalOptions(LLAVA, "fashion-mnist", "catp", (98,), params={"shots": "1"}, limit=32))
    assert report.unpruned.accuracy > 0.6
    assert report.keeps[0].baseline_keep == 49 and report.tokens == 392


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    data = load_dataset("fashion-mnist", "test").subset(8)
    images, labels = np.array(data.images), np.array(data.labels)
    return images, labels, tmp_path_factory.mktemp("datasets")


def _bad_cases(few: tuple[np.ndarray, np.ndarray, Path]) -> list[tuple[list[str], str]]:
    images, labels, where = few
    big = np.kron(images, np.ones((1, 2, 2), dtype=np.uint8))  # 56x56
    large = _npz(where / "large.npz", big, labels)
    wrong = _npz(where / "labels.npz", images, labels + 5)
    empty = _npz(where / "empty.npz", images[:0], labels[:0])
    text = where / "notes.txt"
    text.write_text("not a dataset")
    hiprune = ["--method", "hiprune", "--keep", "49"]
    # random-initialised zoo models are refused as such; as a user's directories, each is refused for what it lacks
    bare_clip, bare_llava, policy = (str(resolve(f"zoo:{n}").path) for n in ("tiny-clip", "tiny-llava", "tiny-openvla"))
    return [
        ([VIT, "--dataset", str(large), *hiprune], "images are 56x56 but the model takes 28x28; pass --resize"),
        ([VIT, "--dataset", str(wrong), *hiprune], "has labels up to 14, but the model knows 10 classes"),
        ([VIT, "--dataset", str(empty), *hiprune], "no images"),
        ([VIT, "--dataset", str(text), *hiprune], "notes.txt"),
        ([VIT, "--dataset", "cifar-10", *hiprune], "unknown dataset 'cifar-10'"),
        (["zoo:tiny-clip", "--dataset", "fashion-mnist", *hiprune], "is random-initialised: its accuracy would"),
        ([bare_clip, "--dataset", "fashion-mnist", *hiprune], "without a classification head"),
        ([bare_llava, "--dataset", "fashion-mnist", *hiprune], "no tokenizer with a chat template"),
        ([policy, "--dataset", "fashion-mnist", "--method", "fastv", "--keep", "64"], "image classifier"),
        ([VIT, "--dataset", "fashion-mnist", "--method", "none", "--keep", "49"], "--method none is the unpruned"),
        ([VIT, "--dataset", "fashion-mnist", *hiprune, "--keeps", "98,49"], "one of the two"),
        ([VIT, "--dataset", "fashion-mnist", "--method", "hiprune", "--keeps", "98,half"], "comma-separated"),
        ([VIT, "--dataset", "fashion-mnist", *hiprune, "--batch-size", "65"], "--batch-size 65 is outside 1..64"),
        ([VIT, "--dataset", "fashion-mnist", *hiprune, "--seeds", "1"], "at least 2 seeds"),
        ([VIT, "--dataset", "fashion-mnist", *hiprune, "--param", "feature_layer=3"], "drop --param feature_layer=3"),
        ([VIT, "--dataset", "fashion-mnist", "--method", "hiprune", "--keep", "197"], "--keep 197 is out of range"),
    ]


def test_bad_input_is_one_line_and_exit_2(
    few: tuple[np.ndarray, np.ndarray, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in _bad_cases(few):
        code = main(["eval", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert message in " ".join(err.split()), (message, err)
        assert "Traceback" not in err


def test_resize_makes_another_size_usable(few: tuple[np.ndarray, np.ndarray, Path]) -> None:
    images, labels, where = few
    large = _npz(where / "resizable.npz", np.kron(images, np.ones((1, 2, 2), dtype=np.uint8)), labels)
    report = evaluate(EvalOptions(VIT, str(large), "uniform", (49,), resize=True, seeds=2))
    assert report.dataset.resized and report.dataset.images == len(labels)


def test_more_than_a_tenth_of_a_percent_of_disagreements_is_drift(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 answer in 1000 differing is within tolerance (a near-tie when its margin is small); 2 are drift, and
    `tpc eval` exits 1 for drift, after printing its table."""
    labels = np.zeros(1000, dtype=np.int64)
    eager = Predictions(labels.copy(), np.full(1000, 3.0, dtype=np.float32))
    one = Predictions(np.where(np.arange(1000) == 7, 1, 0), np.full(1000, 0.01, dtype=np.float32))
    two = Predictions(np.where(np.arange(1000) < 2, 1, 0), np.full(1000, 0.01, dtype=np.float32))
    within = compare_exported("onnx", eager, one, labels, 1.0)
    assert within.within_tolerance and [d.index for d in within.disagreements] == [7]
    assert within.disagreements[0].near_tie and within.agreement == pytest.approx(0.999)
    beyond = compare_exported("onnx", eager, two, labels, 1.0)
    assert not beyond.within_tolerance

    report = evaluate(EvalOptions(VIT, "fashion-mnist", "uniform", (49,), limit=32, seeds=2))
    drifted = replace(report, target="onnx", keeps=[replace(report.keeps[0], exported=beyond)])
    monkeypatch.setattr("tpc.evaluation.evaluate", lambda options, **_: drifted)
    code = main(["eval", VIT, "--dataset", "fashion-mnist", "--method", "uniform", "--keep", "49"])
    assert code == 1
    assert "answers differently from eager on more than 0.1 % of the images (keep 49)" in capsys.readouterr().err
