"""The trained zoo models: shipped in Hugging Face layout with the log of the run that made them, their recorded
accuracy reproduced by `tpc eval`, and `tpc testbed train` deterministic and checked like every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tpc.cli import main
from tpc.datasets import load_dataset, to_pixels
from tpc.kinds.classify import Batch, classifier
from tpc.models_zoo import resolve
from tpc.models_zoo.zoo import CHECKPOINTS
from tpc.pipeline import PruneRequest, plan


@pytest.mark.parametrize("name", ["fmnist-vit", "fmnist-llava"])
def test_trained_checkpoints_ship_with_their_training_log(name: str) -> None:
    source = resolve(f"zoo:{name}")
    assert source.path == CHECKPOINTS / name
    files = {path.name for path in source.path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training.log", "training.json"} <= files
    record = json.loads((source.path / "training.json").read_text())
    assert record["test_images"] == 10000 and record["test_accuracy"] > 0.8
    assert record["minutes"] <= 15  # the budget per model on 2 cores
    log = (source.path / "training.log").read_text()
    assert f"tpc testbed train {name}" in log and f"test accuracy {record['test_accuracy']:.4f}" in log


def test_recorded_accuracy_is_what_tpc_eval_measures() -> None:
    """The unpruned model read as `tpc eval` reads it (the model's own class, the processor's normalisation from
    preprocessor_config.json, the dataset module's pixels) scores on the full 10000-image test split what training
    recorded."""
    record = json.loads((CHECKPOINTS / "fmnist-vit" / "training.json").read_text())
    reader = classifier(plan(PruneRequest("zoo:fmnist-vit", "none", None, {"feature_layer": "4"}, batch=64)))
    data = load_dataset("fashion-mnist", "test")
    prep = reader.preprocessing
    pixels = to_pixels(data.images, (prep.size, prep.size), prep.channels, prep.mean, prep.std)
    run = reader.unpruned()
    predicted = np.concatenate([run(Batch(pixels[i : i + 500])).labels for i in range(0, len(data), 500)])
    assert float((predicted == data.labels).mean()) == pytest.approx(record["test_accuracy"], abs=1e-3)


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Two short runs of the recipe give the same weights byte for byte (seeded, one thread): what makes the shipped
    accuracy reproducible by `tpc testbed train`."""
    for name in ("a", "b"):
        assert main(["testbed", "train", "fmnist-vit", "--steps", "2", "--output", str(tmp_path / name)]) == 0
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    assert json.loads((tmp_path / "a" / "training.json").read_text())["recipe"]["steps"] == 2
    assert resolve(str(tmp_path / "a")).adapter.family == "clip"  # loads as any user's CLIP checkpoint


def test_bad_testbed_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        (["fmnist-gpt", "--output", str(tmp_path / "x")], "unknown testbed recipe 'fmnist-gpt'"),
        (["fmnist-vit", "--output", str(tmp_path / "x"), "--steps", "0"], "--steps 0"),
        (["fmnist-vit", "--output", str(existing)], "already exists; pass --force"),
        (["fmnist-vit", "--output", str(tmp_path / "x"), "--encoder", str(existing)], "--encoder applies to"),
        (["fmnist-llava", "--output", str(tmp_path / "x"), "--encoder", str(existing)], "holds no trained"),
        (["fmnist-vit", "--output", "."], "is the working directory"),
    ]
    for args, message in cases:
        code = main(["testbed", "train", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in " ".join(err.split()), (args, err)
    assert not (tmp_path / "x").exists() and list(existing.iterdir()) == []
