"""End to end: `tpc export` writes a static ONNX graph that ONNX Runtime runs exactly like eager PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from tpc.cli import main
from tpc.exporter.onnx import StaticShapeError, check_static_graph
from tpc.verification import verify

VISION_METHODS = ["hiprune", "divprune", "random", "uniform"]

STANDALONE_ORT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnxruntime as ort
    directory = sys.argv[1]
    inputs = dict(np.load(f"{directory}/samples/inputs.npz"))
    expected = dict(np.load(f"{directory}/samples/expected.npz"))
    session = ort.InferenceSession(f"{directory}/model.onnx", providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, inputs)))
    assert set(outputs) == set(expected), (sorted(outputs), sorted(expected))
    np.testing.assert_array_equal(outputs["kept_indices"], expected["kept_indices"])
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-3, atol=1e-4)
    assert "torch" not in sys.modules
    print("reproduced", {k: v.shape for k, v in outputs.items()})
    """
)


def cli_export(model: str, out: Path, *options: str) -> int:
    return main(["export", model, "--output", str(out), *options])


def test_cli_export_then_separate_process_reproduces_expected(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_export("zoo:tiny-clip", out, "--method", "hiprune", "--keep", "16", "--target", "onnx") == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "samples", "tpc.json"]
    manifest = json.loads((out / "tpc.json").read_text())
    assert manifest["verification"]["passed"] is True
    (component,) = manifest["components"]
    assert component["name"] == "model" and component["artifact"] == "model.onnx"
    assert component["outputs"] == [
        {"name": "kept_features", "shape": [1, 16, 64], "dtype": "float32"},
        {"name": "kept_indices", "shape": [1, 16], "dtype": "int64"},
    ]
    assert component["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert manifest["method"] == "hiprune" and manifest["keep"] == 16 and manifest["target"] == "onnx"
    assert {"torch", "onnx", "onnxruntime", "transformers", "tpc"} <= set(manifest["versions"])
    result = subprocess.run([sys.executable, "-c", STANDALONE_ORT, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "reproduced" in result.stdout
    assert main(["verify", str(out), "--samples", "3", "--json", str(tmp_path / "v.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["samples"] == 3


@pytest.mark.parametrize("model", ["zoo:tiny-clip", "zoo:tiny-siglip"])
@pytest.mark.parametrize("method", VISION_METHODS)
def test_verify_passes_for_every_vision_method(exported: Callable[..., Path], model: str, method: str) -> None:
    directory = exported(model, method, 40)  # hiprune: k_a = round(40 * 0.1 / 5) = 1 anchor
    report = verify(directory, samples=3)
    assert report.passed, report.diagnosis
    assert report.kept_rows_agreeing == report.kept_rows == 3
    graph = onnx.load(str(directory / "model.onnx"))
    check_static_graph(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "TopK" in ops and not {"Sort", "NonZero", "Unique"} & ops
    expected = dict(np.load(directory / "samples" / "expected.npz"))
    assert expected["kept_indices"].shape == (1, 40)
    assert np.all(np.diff(expected["kept_indices"], axis=-1) > 0)  # ascending, unique


def _save_local(tmp_path: Path, model: torch.nn.Module) -> Path:
    directory = tmp_path / "my-model"
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("config", "model_class"),
    [
        (
            CLIPVisionConfig(
                image_size=48,
                patch_size=6,
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=6,
                num_attention_heads=3,
                initializer_factor=4.0,
            ),
            CLIPVisionModel,
        ),
        (
            SiglipVisionConfig(
                image_size=40,
                patch_size=5,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_channels=1,
            ),
            SiglipVisionModel,
        ),
    ],
)
def test_user_model_directory_not_in_zoo(tmp_path: Path, config: object, model_class: type) -> None:
    torch.manual_seed(1)
    directory = _save_local(tmp_path, model_class(config))
    out = tmp_path / "out"
    assert cli_export(str(directory), out, "--method", "hiprune", "--keep", "20") == 0
    manifest = json.loads((out / "tpc.json").read_text())
    grid = config.image_size // config.patch_size
    assert manifest["tokens"]["grid"] == [grid, grid] and manifest["tokens"]["before"] == grid * grid
    assert manifest["model"]["path"] == str(directory.resolve())
    assert verify(out, samples=2).passed


def test_full_clip_checkpoint_directory_loads_its_vision_tower(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision = {
        "image_size": 32,
        "patch_size": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    directory = _save_local(tmp_path, CLIPModel(CLIPConfig(vision_config=vision, text_config=text)))
    out = tmp_path / "out"
    assert cli_export(str(directory), out, "--method", "uniform", "--keep", "16") == 0
    assert json.loads((out / "tpc.json").read_text())["tokens"] == {
        "before": 64,
        "after": 16,
        "grid": [8, 8],
        "prefix_tokens": 1,
        "stage": "vision",
    }


def test_unpruned_baseline_and_batched_export(exported: Callable[..., Path]) -> None:
    baseline = exported("zoo:tiny-clip", "none", None)
    expected = dict(np.load(baseline / "samples" / "expected.npz"))
    assert expected["kept_features"].shape == (1, 256, 64)
    np.testing.assert_array_equal(expected["kept_indices"], np.arange(256)[None])
    assert verify(baseline, samples=2).passed
    batched = exported("zoo:tiny-siglip", "hiprune", 40, batch=2)
    report = verify(batched, samples=2)
    assert report.passed and report.kept_rows == 4


def test_static_shape_checker_rejects_data_dependent_graphs() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], "g", [x], [y])
    with pytest.raises(StaticShapeError, match="NonZero"):
        check_static_graph(helper.make_model(graph))
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    values = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n"])
    indices = helper.make_tensor_value_info("i", TensorProto.INT64, ["n"])
    topk = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="dynamic_topk")
    with pytest.raises(StaticShapeError, match="dynamic_topk"):
        check_static_graph(helper.make_model(helper.make_graph([topk], "g", [x, k], [values, indices])))


def test_fp16_export_verifies_with_scaled_tolerance(tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    assert cli_export("zoo:tiny-clip", out, "--method", "hiprune", "--keep", "40", "--dtype", "fp16") == 0
    manifest = json.loads((out / "tpc.json").read_text())
    (component,) = manifest["components"]
    assert component["inputs"][0]["dtype"] == "float16" and component["outputs"][0]["dtype"] == "float16"
    assert manifest["verification"]["atol_scaled_by_max"] is True
    assert manifest["verification"]["kept_rows_agreeing"] == manifest["verification"]["kept_rows"]
