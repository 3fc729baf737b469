"""`tpc profile`'s measurement on a CUDA GPU: the pruned model's time to first token against the unpruned one's.

ONNX Runtime's CUDA execution provider is not installable on the project's GPU machines (no network there, and the
wheel is larger than what travels), so this runs tpc's eager components on CUDA, the PyTorch eager path: the same
static graphs tpc exports (taps, select op, scheduled decoder), timed with CUDA events after a synchronize, pruned
and unpruned interleaved round by round (A B, B A, ...), the speedup a ratio per percentile with the paired
bootstrap of `tpc.profiling.stats` (the statistics every `tpc profile` report uses).

Run on a machine with a CUDA GPU: `python -m pytest -q device_tests/test_profile_gpu.py`; set TPC_GPU_RESULTS=FILE
to also write the figures as JSON (benchmarks/results/profile_gpu.json is one such run, with its machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tpc.contract.names import PREFILL, VISION
from tpc.pipeline import PruneRequest, build
from tpc.profiling.stats import Summary, paired_ratios

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

MODEL, KEEP, ROUNDS, WARMUP = "zoo:llava-bench", 64, 30, 5


def first_token_call(method: str, keep: int | None):  # -> a zero-argument callable timing vision + prefill in ms
    pruned = build(PruneRequest(MODEL, method, keep, max_new_tokens=8))
    samples = pruned.samples(0)
    components = {name: c.module.to("cuda").eval() for name, c in pruned.components.items()}
    vision_inputs = [samples[VISION][n].to("cuda") for n in pruned.components[VISION].input_names]
    prefill_spec = pruned.components[PREFILL]
    prefill_inputs = {n: t.to("cuda") for n, t in samples[PREFILL].items()}
    vision_outputs = pruned.components[VISION].output_names

    def call() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        with torch.inference_mode():
            outputs = dict(zip(vision_outputs, components[VISION](*vision_inputs), strict=True))
            feed = {**prefill_inputs, **{n: v for n, v in outputs.items() if n in prefill_inputs}}
            components[PREFILL](*[feed[n] for n in prefill_spec.input_names])
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    return call


def test_pruned_first_token_is_measurably_faster_on_the_gpu() -> None:
    pruned, unpruned = first_token_call("hiprune", KEEP), first_token_call("none", None)
    export_ms: list[float] = []
    baseline_ms: list[float] = []
    for index in range(WARMUP + ROUNDS):
        order = [(pruned, export_ms), (unpruned, baseline_ms)]
        for call, samples in order if index % 2 == 0 else order[::-1]:
            elapsed = call()
            if index >= WARMUP:
                samples.append(elapsed)
    ratios = paired_ratios(export_ms, baseline_ms)
    figures = {
        "model": MODEL,
        "keep": KEEP,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "path": "PyTorch eager on CUDA (tpc's static components), fp32",
        "pruned": Summary.of(export_ms).__dict__,
        "unpruned": Summary.of(baseline_ms).__dict__,
        "ratios": [r.__dict__ for r in ratios],
    }
    if os.environ.get("TPC_GPU_RESULTS"):
        Path(os.environ["TPC_GPU_RESULTS"]).write_text(json.dumps(figures, indent=1) + "\n")
    p50 = ratios[0]
    assert p50.measurable and p50.ratio > 1, figures
