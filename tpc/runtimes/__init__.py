"""Runtimes, one module each: load an artifact, run it, time it; and the loops over an export: `Encoder`, `VLM`
(greedy generation) and `tpc.runtimes.policy.Policy`. numpy and the runtime's own package only, never torch."""

from __future__ import annotations

from tpc.runtimes.base import RUNTIME_CLASSES, Runtime, runtime_named
from tpc.runtimes.coreml import CoreMLRuntime
from tpc.runtimes.encoder import Encoder
from tpc.runtimes.executorch import ExecuTorchRuntime
from tpc.runtimes.generation import VLM, GenerationLoop
from tpc.runtimes.inputs import NonFiniteInputWarning
from tpc.runtimes.onnxruntime import OnnxRuntime
from tpc.runtimes.tensorrt import TensorRTRuntime

RUNTIMES: dict[str, type[Runtime]] = {name: runtime_named(name) for name in RUNTIME_CLASSES}

__all__ = [
    "RUNTIMES",
    "VLM",
    "CoreMLRuntime",
    "Encoder",
    "ExecuTorchRuntime",
    "GenerationLoop",
    "NonFiniteInputWarning",
    "OnnxRuntime",
    "Runtime",
    "TensorRTRuntime",
]
