"""Runtimes, one module each: load an artifact, run it, time it."""

from __future__ import annotations

from tpc.runtimes.base import Runtime
from tpc.runtimes.coreml import CoreMLRuntime
from tpc.runtimes.executorch import ExecuTorchRuntime
from tpc.runtimes.generation import VLM, GenerationLoop
from tpc.runtimes.onnxruntime import OnnxRuntime
from tpc.runtimes.tensorrt import TensorRTRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    r.name: r for r in (OnnxRuntime, TensorRTRuntime, ExecuTorchRuntime, CoreMLRuntime)
}

__all__ = [
    "RUNTIMES",
    "VLM",
    "CoreMLRuntime",
    "ExecuTorchRuntime",
    "GenerationLoop",
    "OnnxRuntime",
    "Runtime",
    "TensorRTRuntime",
]
