"""TensorRT engines from tpc's TensorRT-legal ONNX, verified against eager (needs TensorRT 10 and a CUDA GPU).

Run on a Jetson or a workstation with TensorRT: `python -m pytest -q device_tests/test_tensorrt_engine.py`.
Elsewhere every test is skipped with the reason. The plugin case builds `plugin/` with CMake first
(`TensorRT_ROOT`, default /usr as on JetPack).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

tensorrt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it installs only with NVIDIA's host)")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")

from tpc.exporting import export  # noqa: E402
from tpc.pipeline import PruneRequest  # noqa: E402
from tpc.profiling import profile  # noqa: E402


@pytest.mark.parametrize(
    ("model", "method", "keep", "dtype"),
    [
        ("zoo:tiny-llava", "hiprune", 64, "fp32"),
        ("zoo:tiny-llava", "hiprune", 64, "fp16"),
        ("zoo:tiny-qwen25vl", "hiprune", 32, "fp32"),  # windowed tower, merged tokens, M-RoPE
        ("zoo:tiny-qwen3vl", "fastv", 32, "fp32"),  # DeepStack, a prefill prune
    ],
)
def test_native_engine_matches_eager(tmp_path: Path, model: str, method: str, keep: int, dtype: str) -> None:
    result = export(PruneRequest(model, method, keep, dtype=dtype), "tensorrt", tmp_path / "trt")
    assert result.skipped is None and result.report is not None and result.report.passed, result.report
    assert (tmp_path / "trt" / "vision.engine").exists()
    assert profile(tmp_path / "trt", runs=5, warmup=1).components


def test_plugin_engine_matches_eager(tmp_path: Path) -> None:
    out = tmp_path / "plugin"
    first = export(
        PruneRequest("zoo:tiny-llava", "hiprune", 64), "tensorrt", out, run_verify=False,
        target_options={"trt_select": "plugin"},
    )  # fmt: skip
    assert first.manifest.components[0].graph["plugin_nodes"] >= 1
    root = os.environ.get("TensorRT_ROOT", "/usr")
    subprocess.run(["cmake", "-S", "plugin", "-B", "plugin/build", f"-DTensorRT_ROOT={root}"], cwd=out, check=True)
    subprocess.run(["cmake", "--build", "plugin/build", "-j"], cwd=out, check=True)
    from tpc.verification import verify

    report = verify(out, samples=2)
    assert report.passed, report
