"""Benchmark: time to first token and decode latency of a pruned VLM in ONNX Runtime, next to the FLOPs ideal.

Why this exists: pruning visual tokens is sold as a speedup, and the speedup a user gets on a real runtime is
less than the FLOPs ratio (the vision tower and the text tokens are not pruned, small matmuls run below peak,
the select op and gathers cost something). This script exports one VLM (`--model`) unpruned and with HiPrune and
FastV at that model's keeps, verifies each export against eager PyTorch (components + greedy generation), and
times them side by side in one process:

  time to first token  vision + prefill on the same seeded image and prompt (the export's samples);
  decode               one decode step on the static cache (its cost does not depend on the step: the cache has
                       a fixed size and masked slots cost the same as filled ones).

All exports are loaded at once; each round runs every export once in rotating order, so load from anything else
on the machine falls on all of them alike. Medians over the rounds; speedups are ratios of medians from the same
run, and each one's interquartile range over the per-round ratios (unpruned / pruned within one round) is its
noise figure. The FLOPs-ideal speedup comes from the plan (`tpc inspect`): tower + projector + prefill for the
first token, the prefill alone for the prefill, one decode step for decode.

Models:

  llava-bench     LLaVA-1.5 token geometry (576 image tokens, 47 text tokens), keeps 192/128/64
                  -> benchmarks/results/llava_prefill.{json,png}; `make bench-llava`, about 12 minutes on 2 cores
  qwen25vl-bench  Qwen2.5-VL-3B token geometry (256 merged image tokens, 28 text tokens), keeps 192/128/64/32,
                  with published reference points beside ours (DART on Qwen3-VL-4B, Jetson Thor: another device
                  and model, drawn and stored apart) -> benchmarks/results/qwen25vl_prefill.{json,png};
                  `make bench-qwen`, about 45 minutes the first time on 2 cores (9 exports of a 36-layer
                  decoder), about 2 minutes to re-time
  tiny-llava, tiny-qwen25vl   smoke runs (keeps 32/16, seconds per export), written into --work

Exports are kept in --work (default /tmp/tpc-bench/<model>-prefill) and a later run reuses the verified ones
(`--force` redoes them), so rerunning only re-times. Timing etiquette on a shared machine: the script waits while
/tmp/tpc-bench/BUSY exists (up to 15 min) and holds /tmp/tpc-bench/TIMING while it times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import onnxruntime
from machine import machine
from rich.console import Console
from rich.progress import Progress
from shared import console_steps, export_verified, reusable, timing_flag, wait_while_busy

from tpc.pipeline import PruneRequest, plan
from tpc.profiling import TimedExport

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ("hiprune", "fastv")
MAX_NEW_TOKENS = 16
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Reference:
    """A speedup someone else published for a visual-token pruner: another device, model and runtime, never measured
    here. It is drawn beside ours at the same pruning ratio (fraction of the image tokens removed)."""

    method: str
    model: str
    device: str
    runtime: str
    metric: str  # what their speedup is a ratio of
    pruning_ratio: float
    speedup: float
    source: str

    @property
    def label(self) -> str:
        return f"{self.method}, {self.model}, {self.device} (published; another device and model)"


DART_DOCS = "https://nvidia.github.io/TensorRT-Edge-LLM/user_guide/features/visual-token-pruning.html"
DART_THOR = tuple(
    Reference(
        "DART",
        "Qwen3-VL-4B",
        "Jetson Thor",
        "TensorRT Edge-LLM (FP16)",
        "LLM prefill latency, unpruned / pruned (single image, 1995-token prefill)",
        ratio,
        speedup,
        f"NVIDIA TensorRT Edge-LLM documentation, Visual-Token Pruning (DART): {DART_DOCS}",
    )
    for ratio, speedup in ((0.25, 1.32), (0.5, 1.95))
)


@dataclass(frozen=True)
class Bench:
    model: str
    results: str | None  # file stem in benchmarks/results; None: a smoke run, written into --work
    keeps: tuple[int, ...]
    references: tuple[Reference, ...] = ()


BENCHES = {
    "llava-bench": Bench("zoo:llava-bench", "llava_prefill", (192, 128, 64)),
    "qwen25vl-bench": Bench("zoo:qwen25vl-bench", "qwen25vl_prefill", (192, 128, 64, 32), DART_THOR),
    "tiny-llava": Bench("zoo:tiny-llava", None, (32, 16)),
    "tiny-qwen25vl": Bench("zoo:tiny-qwen25vl", None, (32, 16), DART_THOR),
}


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
    prefill_flops: int = 0
    prefill_speedup: float = 1.0
    ideal_prefill_speedup: float = 1.0
    # noise: quartiles (25 %, 75 %) of the per-round ratios unpruned / this export, within the same round
    first_token_speedup_iqr: list[float] = field(default_factory=lambda: [1.0, 1.0])
    prefill_speedup_iqr: list[float] = field(default_factory=lambda: [1.0, 1.0])
    decode_speedup_iqr: list[float] = field(default_factory=lambda: [1.0, 1.0])


def configurations(keeps: tuple[int, ...]) -> list[tuple[str, int | None]]:
    return [("none", None)] + [(method, keep) for method in METHODS for keep in keeps]


def label(method: str, keep: int | None) -> str:
    return "unpruned" if keep is None else f"{method} {keep}"


def request(model: str, method: str, keep: int | None) -> PruneRequest:
    return PruneRequest(model, method, keep, max_new_tokens=MAX_NEW_TOKENS)


def ideal(model: str, method: str, keep: int | None) -> tuple[int, int, int]:
    """FLOPs of (vision + projector + prefill, the prefill alone, one decode step) from the plan."""
    flops = plan(request(model, method, keep)).flops()
    return flops["tower"] + flops["projector"] + flops["prefill"], flops["prefill"], flops["decode_token"]


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else [1.0, 1.0]
    low, _, high = statistics.quantiles(values, n=4)
    return [low, high]


def export_one(model: str, method: str, keep: int | None, out: Path, force: bool, console: Console) -> bool:
    """Export and verify (or reuse an earlier verified export of the same request); True when verified."""
    name = label(method, keep)
    manifest = None if force else reusable(out, model, method, keep)
    if manifest is not None and manifest.generation and manifest.generation.max_new_tokens == MAX_NEW_TOKENS:
        console.print(f"{name}: reusing verified export {out}")
        return True
    start = time.perf_counter()
    verified = export_verified(request(model, method, keep), out, 2, console_steps(console, name))
    console.print(f"{name}: exported, verified {verified}, in {time.perf_counter() - start:.0f}s")
    return verified


def plot(results: list[Result], path: Path, model: str, references: tuple[Reference, ...]) -> None:
    unpruned = results[0]
    pruned = [r for r in results if r.method != "none"]
    names = [f"{r.method}\nkeep {r.keep}" for r in pruned]
    xs = range(len(pruned))
    panels = 3 if references else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2 if panels == 2 else 4.8))
    for axis, (measured, ideal_key, title) in zip(
        axes,
        (
            ("first_token_speedup", "ideal_first_token_speedup", "time to first token (vision + prefill)"),
            ("decode_speedup", "ideal_decode_speedup", "decode step"),
        ),
        strict=False,
    ):
        values = [getattr(r, measured) for r in pruned]
        spread = [getattr(r, f"{measured}_iqr") for r in pruned]
        below = [max(v - low, 0) for v, (low, _) in zip(values, spread, strict=True)]
        above = [max(high - v, 0) for v, (_, high) in zip(values, spread, strict=True)]
        axis.bar(
            [x - 0.2 for x in xs],
            values,
            0.4,
            yerr=[below, above],
            capsize=3,
            label="measured (ORT CPU; per-round IQR)",
        )
        axis.bar([x + 0.2 for x in xs], [getattr(r, ideal_key) for r in pruned], 0.4, label="FLOPs ideal")
        top = max(max(high for _, high in spread), *(getattr(r, ideal_key) for r in pruned))
        axis.set_ylim(0, 1.3 * top)  # room for the legend above the bars
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(xs), names, fontsize=8)
        axis.set_ylabel("speedup over unpruned")
        axis.set_title(title)
        axis.legend()
    if references:
        plot_ratios(axes[2], unpruned, pruned, references)
    fig.suptitle(f"{model}: {unpruned.keep} image tokens, ONNX Runtime CPU, speedups measured side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ratios(axis: plt.Axes, unpruned: Result, pruned: list[Result], references: tuple[Reference, ...]) -> None:
    """Prefill and first-token speedups against the fraction of image tokens pruned, with the published points."""
    for colour, method in zip(("tab:blue", "tab:orange"), METHODS, strict=False):
        rows = sorted((r for r in pruned if r.method == method), key=lambda r: -r.keep)
        ratios = [0.0] + [100 * (1 - r.keep / unpruned.keep) for r in rows]
        axis.plot(ratios, [1.0] + [r.prefill_speedup for r in rows], "o-", color=colour, label=f"{method}: prefill")
        axis.plot(
            ratios, [1.0] + [r.first_token_speedup for r in rows], "s:", color=colour, label=f"{method}: first token"
        )
        axis.plot(
            ratios,
            [1.0] + [r.ideal_prefill_speedup for r in rows],
            "--",
            color=colour,
            alpha=0.5,
            label=f"{method}: prefill, FLOPs ideal",
        )
    for index, reference in enumerate(references):
        axis.plot(
            100 * reference.pruning_ratio,
            reference.speedup,
            "*",
            color="black",
            markersize=14,
            linestyle="none",
            label=reference.label if index == 0 else None,
        )
        axis.annotate(
            f"{reference.speedup:.2f}x",
            (100 * reference.pruning_ratio, reference.speedup),
            textcoords="offset points",
            xytext=(8, -4),
            fontsize=8,
        )
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("image tokens pruned (%)")
    axis.set_ylabel("speedup over unpruned")
    axis.set_title("ours (ORT CPU) vs published points at the same pruning ratio", fontsize=10)
    axis.legend(fontsize=7)


def reference_report(references: tuple[Reference, ...], results: list[Result]) -> dict[str, object]:
    """The published points with, beside each, what this run measured at the same pruning ratio."""
    image_tokens = results[0].keep
    points = []
    for reference in references:
        keep = round((1 - reference.pruning_ratio) * image_tokens)
        ours = {
            r.method: {
                "keep": r.keep,
                "prefill_speedup": r.prefill_speedup,
                "first_token_speedup": r.first_token_speedup,
                "ideal_prefill_speedup": r.ideal_prefill_speedup,
                "ideal_first_token_speedup": r.ideal_first_token_speedup,
            }
            for r in results
            if r.method != "none" and r.keep == keep
        }
        points.append({**asdict(reference), "same_ratio_here": {"keep": keep, "measured": ours}})
    return {
        "note": "published by others, measured on another device, model and runtime; not measured here",
        "points": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BENCHES), default="llava-bench")
    parser.add_argument("--keeps", default=None, help="comma-separated image-token budgets (default: the model's)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="results directory (default: benchmarks/results)")
    parser.add_argument("--work", type=Path, default=None, help="exports (default: /tmp/tpc-bench/<model>-prefill)")
    parser.add_argument("--force", action="store_true", help="re-export even where a verified export exists")
    args = parser.parse_args()
    bench = BENCHES[args.model]
    keeps = tuple(int(k) for k in args.keeps.split(",")) if args.keeps else bench.keeps
    work = args.work or Path(f"/tmp/tpc-bench/{args.model}-prefill")
    stem = bench.results if bench.results and keeps == bench.keeps else f"{args.model}_prefill"
    output = args.output or (RESULTS if bench.results and keeps == bench.keeps else work)
    console = Console(soft_wrap=True)  # one line per record, also in a log file
    started = time.time()
    results, timed = [], []
    for method, keep in configurations(keeps):
        out = work / label(method, keep).replace(" ", "-")
        verified = export_one(bench.model, method, keep, out, args.force, console)
        ideal_first, ideal_prefill, ideal_decode = ideal(bench.model, method, keep)
        export_timing = TimedExport(out)
        results.append(
            Result(
                method,
                export_timing.manifest.keep,
                first_token_ms=0,
                vision_ms=0,
                prefill_ms=0,
                decode_ms=0,
                first_token_flops=ideal_first,
                decode_flops=ideal_decode,
                verified=verified,
                prefill_flops=ideal_prefill,
            )
        )
        timed.append(export_timing)
    exports_s = time.time() - started
    waited = wait_while_busy(console)
    load_average = os.getloadavg()[0]
    with timing_flag(), Progress(console=console) as progress:
        task = progress.add_task("timing rounds", total=args.warmup + args.rounds)
        timing_start = time.perf_counter()
        for round_number in range(args.warmup + args.rounds):
            shift = round_number % len(timed)
            for export_timing in timed[shift:] + timed[:shift]:
                export_timing.run_round(record=round_number >= args.warmup)
            progress.advance(task)
        timing_s = time.perf_counter() - timing_start
    base_first, base_parts = timed[0].summaries()
    unpruned, base = results[0], timed[0]
    for result, export_timing in zip(results, timed, strict=True):
        first, parts = export_timing.summaries()  # first token = per-round vision + prefill
        result.first_token_ms, result.vision_ms = first.p50_ms, parts["vision"].p50_ms
        result.prefill_ms, result.decode_ms = parts["prefill"].p50_ms, parts["decode"].p50_ms
        result.first_token_speedup = base_first.p50_ms / first.p50_ms
        result.prefill_speedup = base_parts["prefill"].p50_ms / parts["prefill"].p50_ms
        result.decode_speedup = base_parts["decode"].p50_ms / parts["decode"].p50_ms
        result.ideal_first_token_speedup = unpruned.first_token_flops / result.first_token_flops
        result.ideal_prefill_speedup = unpruned.prefill_flops / result.prefill_flops
        result.ideal_decode_speedup = unpruned.decode_flops / result.decode_flops
        result.first_token_speedup_iqr = quartiles(
            [b / x for b, x in zip(base.headline, export_timing.headline, strict=True)]
        )
        for part in ("prefill", "decode"):
            ratios = [b / x for b, x in zip(base.times[part], export_timing.times[part], strict=True)]
            setattr(result, f"{part}_speedup_iqr", quartiles(ratios))
    output.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "model": bench.model,
        "what": "medians over rounds, exports interleaved in rotating order in one process; speedup = unpruned / x",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "max_new_tokens": MAX_NEW_TOKENS,
        "machine": {
            **machine(onnxruntime=onnxruntime.__version__, ort_threads="default (all cores)"),
            "load_average_1min": {"start": load_average, "end": os.getloadavg()[0]},
        },
        "results": [asdict(r) for r in results],
        "noise": "each *_speedup_iqr: quartiles of the per-round ratios unpruned / export (same round)",
        "exports_s": round(exports_s, 1),
        "waited_for_busy_s": round(waited, 1),
        "timing_phase_s": round(timing_s, 1),
        "work": str(work),
    }
    if bench.references:
        report["references"] = reference_report(bench.references, results)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, output / f"{stem}.png", bench.model, bench.references)
    for r in results:
        console.print(
            f"{label(r.method, None if r.method == 'none' else r.keep):>13}: first token {r.first_token_ms:7.1f} ms "
            f"({r.first_token_speedup:.2f}x [{r.first_token_speedup_iqr[0]:.2f}-{r.first_token_speedup_iqr[1]:.2f}],"
            f" ideal {r.ideal_first_token_speedup:.2f}x), prefill {r.prefill_ms:7.1f} ms ({r.prefill_speedup:.2f}x,"
            f" ideal {r.ideal_prefill_speedup:.2f}x), decode {r.decode_ms:6.2f} ms ({r.decode_speedup:.2f}x"
            f" [{r.decode_speedup_iqr[0]:.2f}-{r.decode_speedup_iqr[1]:.2f}], ideal {r.ideal_decode_speedup:.2f}x),"
            f" verified {r.verified}"
        )
    for point in bench.references:
        keep = round((1 - point.pruning_ratio) * results[0].keep)
        here = ", ".join(
            f"{r.method} {r.prefill_speedup:.2f}x prefill / {r.first_token_speedup:.2f}x first token"
            for r in results
            if r.method != "none" and r.keep == keep
        )
        console.print(
            f"{point.method}, {point.model}, {point.device} (published): {point.pruning_ratio:.0%} pruned, "
            f"{point.speedup:.2f}x prefill; here at keep {keep}: {here or 'not measured'}"
        )
    console.print(f"wrote {output / stem}.json/.png in {time.time() - started:.0f}s (timing {timing_s:.0f}s)")


if __name__ == "__main__":
    main()
