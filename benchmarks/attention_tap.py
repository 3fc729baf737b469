"""Benchmark: attention taps vs `output_attentions=True` for HiPrune's scores on CLIP ViT-L/14-336.

Why this exists: HiPrune consumes one number per key ("attention received": the mean over heads and over all
query rows) from two encoder layers. The usual way to get it asks the model for `output_attentions=True`,
which forces eager attention in every layer and materialises all 24 (B, H, N, N) probability maps. tpc taps
only the two layers it needs, reduces their maps blockwise, runs SDPA everywhere else and stops at the feature
layer. This script measures, side by side in one run, what that saves in wall time and peak memory, how far
it is from a plain SDPA forward (the floor), and checks that the tapped scores equal the reference ones.

Approaches (the zoo's random-init `zoo:clip-vit-l-336`, 577 tokens, d=1024):
  reference  CLIPVisionModel with eager attention, forward with output_attentions=True, then
             `tpc.methods.hiprune.scores` on the two layers' maps;
  tpc        the PrunedVisionEncoder built by `tpc.pipeline.build` (taps + SDPA + token selection);
  sdpa       CLIPVisionModel with SDPA attention and no attentions returned (all 24 layers).

Time: per batch size, one process loads all three side by side, warms each up once, then runs `--repeats`
rounds with the approaches in rotating order, so load from anything else on the machine falls on all of them
alike and the ratios stay fair; each approach reports the median. Memory: each (approach, batch) gets a fresh
spawned process. `from_pretrained` memory-maps the safetensors file, so weights become resident only when first
read: the child reads every parameter once, takes VmRSS as the baseline, resets the peak (`/proc/self/clear_refs`
<- 5, Linux >= 4.0) and reports VmHWM - baseline over one forward: the activation and attention memory alone.
Its scores are the ones checked against the reference (atol 1e-6).

Run: `make bench-taps` (writes benchmarks/results/attention_tap.{json,png}).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import matplotlib
import torch
from machine import machine
from torch import Tensor, nn
from transformers import CLIPVisionModel

from tpc.methods import hiprune
from tpc.models_zoo import resolve
from tpc.pipeline import PruneRequest, build, plan

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODEL = "zoo:clip-vit-l-336"
REQUEST = PruneRequest(MODEL, "hiprune", 192)
APPROACHES = ("reference", "tpc", "sdpa")
THREADS = 2
ATOL = 1e-6
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results"

Forward = Callable[[Tensor], list[Tensor]]


@dataclass
class Measurement:
    """One (approach, batch) configuration: interleaved wall times, and peak memory from its own process."""

    approach: str
    batch: int
    times_ms: list[float]
    median_ms: float
    min_ms: float
    baseline_rss_mib: float
    peak_increase_mib: float


def _status_mib(field: str) -> float:
    """A `VmRSS`/`VmHWM`-style line of /proc/self/status, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current VmRSS (proc(5), /proc/pid/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _pixels(batch: int) -> Tensor:
    return torch.randn((batch, 3, 336, 336), generator=torch.Generator().manual_seed(SEED))


def _load(approach: str, layers: tuple[int, ...]) -> Forward:
    """Load one approach's model with its weights resident; its forward returns the per-layer scores (B, N_patches).

    `sdpa` returns no scores: it is the floor, a forward that computes none.
    """
    if approach == "tpc":
        module = build(REQUEST).module

        def forward(pixels: Tensor) -> list[Tensor]:
            module(pixels)
            return [module.taps[layer].value[:, module.geometry.prefix_tokens :] for layer in layers]

        model: nn.Module = module
    elif approach == "reference":
        model = CLIPVisionModel.from_pretrained(resolve(MODEL).path, attn_implementation="eager").eval()

        def forward(pixels: Tensor) -> list[Tensor]:
            attentions = model(pixel_values=pixels, output_attentions=True).attentions
            return [hiprune.scores(attentions[layer - 1]) for layer in layers]

    else:
        model = CLIPVisionModel.from_pretrained(resolve(MODEL).path, attn_implementation="sdpa").eval()

        def forward(pixels: Tensor) -> list[Tensor]:
            model(pixel_values=pixels)
            return []

    for parameter in model.parameters():  # page the memory-mapped weights in before any measurement
        parameter.sum()
    return forward


def peak_memory(approach: str, batch: int, layers: tuple[int, ...]) -> tuple[float, float, list[Tensor]]:
    """Fresh child process: (baseline VmRSS, VmHWM - baseline over one forward, the forward's scores)."""
    torch.set_num_threads(THREADS)
    pixels = _pixels(batch)
    with torch.inference_mode():
        forward = _load(approach, layers)
        gc.collect()
        baseline = _status_mib("VmRSS")
        _reset_peak_rss()
        scores = [s.clone() for s in forward(pixels)]
        return baseline, _status_mib("VmHWM") - baseline, scores


def wall_times(batch: int, repeats: int, layers: tuple[int, ...]) -> dict[str, list[float]]:
    """Child process: all approaches loaded side by side, one warmup each, then `repeats` rounds in rotating order.

    Interleaving spreads whatever else the machine is doing over every approach alike, so the ratios hold.
    """
    torch.set_num_threads(THREADS)
    pixels = _pixels(batch)
    times: dict[str, list[float]] = {approach: [] for approach in APPROACHES}
    with torch.inference_mode():
        forwards = {approach: _load(approach, layers) for approach in APPROACHES}
        for forward in forwards.values():
            forward(pixels)
        for round_ in range(repeats):
            shift = round_ % len(APPROACHES)
            for approach in APPROACHES[shift:] + APPROACHES[:shift]:
                start = time.perf_counter()
                forwards[approach](pixels)
                times[approach].append((time.perf_counter() - start) * 1000)
    return times


def in_fresh_process(function: Callable[..., Any], *args: object) -> Any:
    """Run `function(*args)` in a newly spawned interpreter and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def ratios(by_key: dict[tuple[str, int], Measurement], batch: int) -> dict[str, float]:
    """Same-run ratios for one batch size."""
    ref, tpc, sdpa = (by_key[a, batch] for a in APPROACHES)
    return {
        "time_reference_over_tpc": ref.median_ms / tpc.median_ms,
        "memory_reference_over_tpc": ref.peak_increase_mib / tpc.peak_increase_mib,
        "time_tpc_over_sdpa": tpc.median_ms / sdpa.median_ms,
        "memory_tpc_over_sdpa": tpc.peak_increase_mib / sdpa.peak_increase_mib,
    }


def plot(measurements: list[Measurement], batches: list[int], path: Path) -> None:
    """Two panels (median time, peak memory increase): one bar group per batch size, one bar per approach."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / len(APPROACHES)
    panels = (
        ("median_ms", "median forward time (ms)", "{:.0f}"),
        ("peak_increase_mib", "peak RSS increase (MiB)", "{:.0f}"),
    )
    for axis, (metric, label, fmt) in zip(axes, panels, strict=True):
        for offset, approach in enumerate(APPROACHES):
            values = [
                getattr(m, metric) for b in batches for m in measurements if (m.approach, m.batch) == (approach, b)
            ]
            positions = [i + (offset - (len(APPROACHES) - 1) / 2) * width for i in range(len(batches))]
            bars = axis.bar(positions, values, width, label=approach)
            axis.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        axis.set_ylabel(label)
        axis.margins(y=0.12)
    axes[0].legend()
    figure.suptitle(f"HiPrune scores on {MODEL}: output_attentions (reference) vs tpc taps vs SDPA floor")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # batches 1 and 4 at 5 repeats (a median robust to one disturbed round): ~5 minutes on an idle 2-core machine
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards after one warmup")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    layers = plan(REQUEST).tapped_layers
    measurements: list[Measurement] = []
    scores: dict[tuple[str, int], list[Tensor]] = {}
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    for batch in args.batches:
        times = in_fresh_process(wall_times, batch, args.repeats, layers)
        for approach in APPROACHES:
            baseline, peak, scores[approach, batch] = in_fresh_process(peak_memory, approach, batch, layers)
            median = statistics.median(times[approach])
            measurements.append(
                Measurement(approach, batch, times[approach], median, min(times[approach]), baseline, peak)
            )
            print(
                f"batch {batch} {approach:>9}: median {median:8.0f} ms (min {min(times[approach]):.0f}), "
                f"peak +{peak:7.1f} MiB (baseline {baseline:.0f} MiB)",
                flush=True,
            )

    by_key = {(m.approach, m.batch): m for m in measurements}
    diffs = {
        batch: max(
            (r - t).abs().max().item() for r, t in zip(scores["reference", batch], scores["tpc", batch], strict=True)
        )
        for batch in args.batches
    }
    max_diff = max(diffs.values())
    report = {
        "model": MODEL,
        "request": {"method": REQUEST.method, "keep": REQUEST.keep},
        "tapped_layers": list(layers),
        "repeats": args.repeats,
        "warmup": 1,
        "timing": "one process per batch, approaches interleaved in rotating order; median of the repeats",
        "memory": "one fresh process per (approach, batch): VmHWM - VmRSS over one forward, weights resident",
        "machine": {
            **machine(torch_threads=THREADS),
            "load_average_1min": {"start": load_average, "end": os.getloadavg()[0]},
        },
        "measurements": [asdict(m) for m in measurements],
        "ratios": {str(batch): ratios(by_key, batch) for batch in args.batches},
        "scores_check": {
            "atol": ATOL,
            "max_abs_diff": max_diff,
            "max_abs_diff_by_batch": {str(b): d for b, d in diffs.items()},
            "passed": max_diff <= ATOL,
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "attention_tap.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(measurements, args.batches, args.output / "attention_tap.png")

    for batch, batch_ratios in report["ratios"].items():
        print(f"batch {batch}: " + ", ".join(f"{name} {value:.2f}x" for name, value in batch_ratios.items()))
    print(f"scores max |reference - tpc| = {max_diff:.3g} (atol {ATOL:g}); total {report['wall_s']} s")
    if max_diff > ATOL:
        raise SystemExit(f"tapped scores differ from the reference by {max_diff:.3g} > {ATOL:g}")


if __name__ == "__main__":
    main()
