"""Bad input: one clear line on stderr, exit 2, no traceback, nothing written or half-written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tpc.cli import main
from tpc.errors import UsageError
from tpc.exporter.onnx import OnnxTarget


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def _export(out: Path, *extra: str, model: str = "zoo:tiny-clip") -> list[str]:
    return ["export", model, "--output", str(out), *extra]


CASES = [
    (["--method", "nosuch", "--keep", "8"], "unknown method 'nosuch'; valid: catp, divprune, fastv, hiprune"),
    (["--method", "hiprune", "--keep", "8", "--target", "tflite"], "unknown target 'tflite'; valid: coreml"),
    (["--method", "hiprune", "--keep", "0"], "--keep 0 is out of range: the encoder has 256 patch tokens"),
    (["--method", "hiprune", "--keep", "257"], "--keep 257 is out of range"),
    (["--method", "hiprune"], "--keep is required for method 'hiprune'"),
    (["--method", "fastv", "--keep", "8"], "method 'fastv' prunes at the llm-prefill stage"),
    (["--method", "hiprune", "--keep", "8", "--param", "alpha"], "--param expects NAME=VALUE"),
    (["--method", "hiprune", "--keep", "8", "--param", "beta=1"], "unknown parameter for method hiprune 'beta'"),
    (["--method", "hiprune", "--keep", "8", "--param", "alpha=high"], "--param alpha=high: expected float"),
    (["--method", "hiprune", "--keep", "8", "--param", "deep_layer=7"], "outside the encoder's layers 1..4"),
    (
        ["--method", "hiprune", "--keep", "4", "--param", "alpha=1"],
        "--keep 4 with method hiprune: alpha=1.0 gives 1 anchor(s)",
    ),
    (["--method", "hiprune", "--keep", "8", "--dtype", "int8"], "unknown dtype 'int8'"),
    (
        ["--method", "hiprune", "--keep", "8", "--target", "tensorrt", "--param", "trt_select=fused"],
        "--param trt_select=fused: expected one of native, plugin",
    ),
    (
        ["--method", "hiprune", "--keep", "8", "--param", "trt_select=plugin"],
        "option 'trt_select' does not apply to target 'onnx'",
    ),
    (
        ["--method", "hiprune", "--keep", "8", "--prompt-len", "32"],
        "--prompt-len and --max-new-tokens apply to VLM models",
    ),
    (["--keep", "8"], "Missing option '--method'"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
def test_bad_export_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str):
    out = tmp_path / "out"
    code, err = _run(capsys, _export(out, *args))
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging directory


def test_unknown_zoo_name_lists_the_zoo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, _export(tmp_path / "o", "--method", "hiprune", "--keep", "8", model="zoo:tiny-vit"))
    listed = "clip-vit-l-336, fmnist-llava, fmnist-vit, llava-bench, openvla-bench, qwen25vl-bench, tiny-clip, "
    listed += "tiny-llava, tiny-openvla, "
    assert code == 2 and f"unknown zoo model 'tiny-vit'; valid: {listed}tiny-qwen25vl, tiny-qwen3vl, tiny-siglip" in err


def test_model_directory_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--method", "hiprune", "--keep", "8"]
    code, err = _run(capsys, _export(tmp_path / "o", *args, model=str(tmp_path / "missing")))
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, _export(tmp_path / "o", *args, model=str(tmp_path / "empty")))
    assert code == 2 and "has no config.json" in err
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    code, err = _run(capsys, _export(tmp_path / "o", *args, model=str(bert)))
    assert code == 2 and "type 'bert', which tpc does not support; supported model types: clip" in err
    (bert / "config.json").write_text('{"model_type": "clip_vision_model"}')
    code, err = _run(capsys, _export(tmp_path / "o", *args, model=str(bert)))
    assert code == 2 and "no weights" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(exported: Callable[..., Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("mine")
    code, err = _run(capsys, _export(out, "--method", "uniform", "--keep", "8"))
    assert code == 2 and "already exists; pass --force" in err
    assert (out / "keep-me.txt").read_text() == "mine"
    assert main(_export(out, "--method", "uniform", "--keep", "8", "--force", "--no-verify")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "samples", "tpc.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired directories left


def test_missing_target_extra_names_the_extra() -> None:
    class NeedsMissingPackage(OnnxTarget):
        requires = ("onnx", "tpc_package_that_is_not_installed")

    with pytest.raises(UsageError, match=r"needs tpc_package_that_is_not_installed.*pip install 'tpc\[onnx\]'"):
        NeedsMissingPackage().check_installed()


def test_verify_bad_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, ["verify", str(tmp_path)])
    assert code == 2 and "is not a tpc export: it has no tpc.json" in err
    (tmp_path / "tpc.json").write_text("{not json")
    code, err = _run(capsys, ["verify", str(tmp_path)])
    assert code == 2 and "is not valid JSON" in err


def test_console_script_prints_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpc",
            "export",
            "zoo:tiny-clip",
            "--method",
            "hiprune",
            "--keep",
            "999",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --keep 999 is out of range: the encoder has 256 patch tokens (use 1..256)"
    ]
