"""Benchmark: time to first token and decode latency of a pruned LLaVA in ONNX Runtime, next to the FLOPs ideal.

Why this exists: pruning visual tokens is sold as a speedup, and the speedup a user gets on a real runtime is
less than the FLOPs ratio (the vision tower and the text tokens are not pruned, small matmuls run below peak,
the select op and gathers cost something). This script exports `zoo:llava-bench` (LLaVA-1.5 token geometry:
576 image tokens, 47 text tokens) unpruned and with HiPrune and FastV at keep 192/128/64, verifies each export
against eager PyTorch (components + greedy generation), and times them side by side in one process:

  time to first token  vision + prefill on the same seeded image and prompt (the export's samples);
  decode               one decode step on the static cache (its cost does not depend on the step: the cache has
                       a fixed size and masked slots cost the same as filled ones).

All exports are loaded at once; each round runs every export once in rotating order, so load from anything else
on the machine falls on all of them alike. Medians over the rounds; speedups are ratios of medians from the same
run. The FLOPs-ideal speedup comes from the plan (`tpc inspect`): tower + projector + prefill for the first
token, one decode step for decode.

Run: `make bench-llava` (writes benchmarks/results/llava_prefill.{json,png}; about 12 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import onnxruntime
from machine import machine
from rich.progress import Progress

from tpc.exporting import export
from tpc.pipeline import PruneRequest, plan
from tpc.profiling import TimedExport

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODEL = "zoo:llava-bench"
METHODS = ("hiprune", "fastv")
KEEPS = (192, 128, 64)
MAX_NEW_TOKENS = 16


@dataclass
class Result:
    method: str
    keep: int
    first_token_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    first_token_flops: int
    decode_flops: int
    first_token_speedup: float = 1.0
    decode_speedup: float = 1.0
    ideal_first_token_speedup: float = 1.0
    ideal_decode_speedup: float = 1.0
    verified: bool = False


def configurations() -> list[tuple[str, int | None]]:
    return [("none", None)] + [(method, keep) for method in METHODS for keep in KEEPS]


def label(method: str, keep: int | None) -> str:
    return "unpruned" if keep is None else f"{method} {keep}"


def ideal(method: str, keep: int | None) -> tuple[int, int]:
    """FLOPs of (vision + projector + prefill, one decode step) from the plan."""
    flops = plan(PruneRequest(MODEL, method, keep, max_new_tokens=MAX_NEW_TOKENS)).flops()
    return flops["tower"] + flops["projector"] + flops["prefill"], flops["decode_token"]


def plot(results: list[Result], path: Path) -> None:
    pruned = [r for r in results if r.method != "none"]
    names = [f"{r.method}\nkeep {r.keep}" for r in pruned]
    xs = range(len(pruned))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, (measured, ideal_key, title) in zip(
        axes,
        (
            ("first_token_speedup", "ideal_first_token_speedup", "time to first token (vision + prefill)"),
            ("decode_speedup", "ideal_decode_speedup", "decode step"),
        ),
        strict=True,
    ):
        axis.bar([x - 0.2 for x in xs], [getattr(r, measured) for r in pruned], 0.4, label="measured (ORT CPU)")
        axis.bar([x + 0.2 for x in xs], [getattr(r, ideal_key) for r in pruned], 0.4, label="FLOPs ideal")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(xs), names, fontsize=8)
        axis.set_ylabel("speedup over unpruned")
        axis.set_title(title)
        axis.legend()
    fig.suptitle(f"{MODEL}: 576 image tokens, ONNX Runtime CPU, speedups measured side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tpc-bench-llava-"))
    load_average = os.getloadavg()[0]
    results, timed = [], []
    with Progress() as progress:
        task = progress.add_task("export + verify", total=len(configurations()))
        for method, keep in configurations():
            out = workdir / label(method, keep).replace(" ", "-")
            request = PruneRequest(MODEL, method, keep, max_new_tokens=MAX_NEW_TOKENS)
            result = export(request, "onnx", out, force=True, run_verify=True, samples=2)
            ideal_first, ideal_decode = ideal(method, keep)
            results.append(Result(method, result.manifest.keep, 0, 0, 0, 0, ideal_first, ideal_decode))
            results[-1].verified = bool(result.report and result.report.passed)
            timed.append(TimedExport(out))
            progress.advance(task)
        task = progress.add_task("timing rounds", total=args.warmup + args.rounds)
        for round_number in range(args.warmup + args.rounds):
            shift = round_number % len(timed)
            for export_timing in timed[shift:] + timed[:shift]:
                export_timing.run_round(record=round_number >= args.warmup)
            progress.advance(task)
    base_first, base_parts = timed[0].timings()
    unpruned = results[0]
    for result, export_timing in zip(results, timed, strict=True):
        first, parts = export_timing.timings()  # first token = per-round vision + prefill
        result.first_token_ms, result.vision_ms = first.median_ms, parts["vision"].median_ms
        result.prefill_ms, result.decode_ms = parts["prefill"].median_ms, parts["decode"].median_ms
        result.first_token_speedup = base_first.median_ms / first.median_ms
        result.decode_speedup = base_parts["decode"].median_ms / parts["decode"].median_ms
        result.ideal_first_token_speedup = unpruned.first_token_flops / result.first_token_flops
        result.ideal_decode_speedup = unpruned.decode_flops / result.decode_flops
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "model": MODEL,
        "what": "medians over rounds, exports interleaved in rotating order in one process; speedup = unpruned / x",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "max_new_tokens": MAX_NEW_TOKENS,
        "machine": {
            **machine(onnxruntime=onnxruntime.__version__, ort_threads="default (all cores)"),
            "load_average_1min": {"start": load_average, "end": os.getloadavg()[0]},
        },
        "results": [asdict(r) for r in results],
    }
    (args.output / "llava_prefill.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.output / "llava_prefill.png")
    for r in results:
        print(
            f"{label(r.method, None if r.method == 'none' else r.keep):>13}: first token {r.first_token_ms:7.1f} ms "
            f"({r.first_token_speedup:.2f}x, ideal {r.ideal_first_token_speedup:.2f}x), decode {r.decode_ms:6.2f} ms "
            f"({r.decode_speedup:.2f}x, ideal {r.ideal_decode_speedup:.2f}x), verified {r.verified}"
        )


if __name__ == "__main__":
    main()
