"""Benchmark: the control rate a VLA-Pruner policy sustains in ONNX Runtime, next to the unpruned policy's.

Why this exists: a robot policy is judged by the rate at which it can close the loop (a step must finish before
the next camera frame is due), and by its worst steps, not by a FLOPs ratio. VLA-Pruner is also stateful: the
first `window` steps of every episode run a warm-up graph that keeps every image token, so an episode mixes
two costs. This script exports `zoo:openvla-bench` (OpenVLA-7B token geometry: 256 image tokens from the fused
DINOv2 + SigLIP towers, 24 text tokens, a 280-position prompt, an 8-layer Llama at d=1024; one control step is
one graph with the 7-token action decode unrolled) unpruned and with VLA-Pruner at keep 128/64/32, verifies each
export against eager PyTorch (per-graph outputs and a whole seeded episode), then drives all four policies with
`tpc.runtimes.policy.Policy` side by side in one process on the same seeded episodes:

  every step t of every episode runs each policy once on the same frame, in an order that rotates with t, so
  anything else the machine does falls on all of them alike; `reset()` at every episode start; one untimed
  episode first (session warm-up); each `step_result` call is timed with `time.perf_counter` (preprocessing,
  the graph and the action decode: what a control loop pays).

Per policy: p50/p99 of all steps, of the warm-up steps and of the steady-state steps (`pruned`, or the unpruned
policy's `step`); the control rate that steady state sustains at p50 and at p99; the measured speedup of pruned
steps over unpruned ones (ratio of p50s from the same run) and the FLOPs-ideal one from the plans
(`VlaPlan.flops()["step"]`). With a few dozen steps per policy the p99 is close to the slowest step.

Timing etiquette on a shared machine: before timing the script waits (up to 15 min) while `/tmp/tpc-bench/BUSY`
exists, and it holds `/tmp/tpc-bench/TIMING` while it times, so that cooperating processes stay quiet.

Run: `make bench-openvla` (writes benchmarks/results/openvla_control.{json,png}). The first run exports: 10-14
minutes per export on 2 cores, about 45 minutes in all, 5.7 GB in `--work` (0.8 GB unpruned, 1.6 GB per VLA-Pruner
export); later runs reuse the verified exports (`--force` redoes them) and take about 4 minutes.
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
import numpy as np
import onnxruntime
from machine import machine
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from shared import console_steps, export_verified, reusable, timing_flag, wait_while_busy

from tpc.contract.names import PRUNED, STEP, WARMUP
from tpc.errors import VerificationFailed
from tpc.kinds.policy import VlaPlan, seeded_frames, seeded_prompt
from tpc.pipeline import PruneRequest, plan
from tpc.runtimes.policy import Policy

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODEL = "zoo:openvla-bench"
METHOD = "vla-pruner"
KEEPS = (128, 64, 32)
EXPORT_LOG = "export_times.json"  # in --work: how long each kept export took, for runs that reuse it


@dataclass
class ExportInfo:
    label: str
    directory: str
    verified: bool
    reused: bool
    export_s: float | None  # wall time of export + verification (from the run that made it, when reused)
    disk_mb: float
    diagnosis: str = ""


@dataclass
class Latency:
    steps: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, ms: list[float]) -> Latency | None:
        if not ms:
            return None
        values = np.asarray(ms)
        return cls(
            len(ms),
            *(float(np.percentile(values, q)) for q in (50, 99)),
            float(values.mean()),
            float(values.min()),
            float(values.max()),
        )


@dataclass
class Result:
    label: str
    method: str
    keep: int  # image tokens kept in steady-state steps
    graphs: list[str]
    step_flops: int  # steady-state step
    warmup_flops: int | None
    overall: Latency | None = None
    warmup: Latency | None = None
    steady: Latency | None = None  # `pruned` steps, or every step of the unpruned policy
    rate_hz_p50: float = 0.0
    rate_hz_p99: float = 0.0
    speedup: float = 1.0  # unpruned p50 / steady p50
    speedup_p99: float = 1.0
    ideal_speedup: float = 1.0  # unpruned step FLOPs / steady step FLOPs
    warmup_vs_unpruned: float | None = None  # warm-up p50 / unpruned p50 (the warm-up graph's overhead)
    episode_speedup: float = 1.0  # unpruned total / this policy's total over the same timed steps
    kept_tokens: dict[str, list[int]] = field(default_factory=dict)  # graph -> distinct kept counts seen
    times_ms: list[float] = field(default_factory=list)
    graph_per_step: list[str] = field(default_factory=list)


def configurations(keeps: tuple[int, ...]) -> list[tuple[str, int | None]]:
    return [("none", None)] + [(METHOD, keep) for keep in keeps]


def label(method: str, keep: int | None) -> str:
    return "unpruned" if keep is None else f"{method}-{keep}"


def request(model: str, method: str, keep: int | None) -> PruneRequest:
    return PruneRequest(model, method, keep)


def disk_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def export_all(
    model: str, keeps: tuple[int, ...], work: Path, force: bool, console: Console, progress: Progress
) -> list[ExportInfo]:
    log_path = work / EXPORT_LOG
    log: dict[str, float] = json.loads(log_path.read_text()) if log_path.exists() else {}
    infos = []
    task = progress.add_task("export + verify", total=len(configurations(keeps)))
    for method, keep in configurations(keeps):
        name = label(method, keep)
        out = work / name
        if not force and reusable(out, model, method, keep) is not None:
            console.print(f"reusing verified export {out}")
            infos.append(ExportInfo(name, str(out), True, True, log.get(name), disk_mb(out)))
            progress.advance(task)
            continue
        start = time.perf_counter()
        verified, diagnosis = False, ""
        try:
            verified = export_verified(request(model, method, keep), out, 1, console_steps(console, name))
        except VerificationFailed as failure:
            diagnosis = f"verification failed: {failure.report.diagnosis}"
        except Exception as error:  # an export that fails is reported, the others still run
            diagnosis = f"{type(error).__name__}: {error}"
        elapsed = time.perf_counter() - start
        if verified:
            log[name] = elapsed
            log_path.write_text(json.dumps(log, indent=2) + "\n")
        console.print(f"{name}: {'verified' if verified else diagnosis} in {elapsed:.0f}s")
        size = disk_mb(out) if out.exists() and verified else 0.0
        infos.append(ExportInfo(name, str(out), verified, False, elapsed, size, diagnosis))
        progress.advance(task)
    return infos


def run_episodes(
    policies: list[Policy],
    results: list[Result],
    base: VlaPlan,
    episodes: int,
    steps: int,
    warmup_episodes: int,
    progress: Progress,
) -> None:
    """Every step of every episode runs each policy once on the same frame; the order rotates with the step."""
    task = progress.add_task("timed steps", total=(warmup_episodes + episodes) * steps)
    for episode in range(warmup_episodes + episodes):
        record = episode >= warmup_episodes
        seed = episode - warmup_episodes if record else 1000 + episode  # the untimed episodes use other seeds
        frames, prompt = seeded_frames(base, seed, steps), seeded_prompt(base, seed)
        for policy in policies:
            policy.reset()
        for t, frame in enumerate(frames):
            shift = (episode * steps + t) % len(policies)
            order = list(range(len(policies)))[shift:] + list(range(len(policies)))[:shift]
            for index in order:
                start = time.perf_counter()
                step = policies[index].step_result(frame, prompt)
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if record:
                    result = results[index]
                    result.times_ms.append(elapsed_ms)
                    result.graph_per_step.append(step.graph)
                    kept = result.kept_tokens.setdefault(step.graph, [])
                    if len(step.kept_indices) not in kept:
                        kept.append(len(step.kept_indices))
            progress.advance(task)


def summarise(results: list[Result]) -> None:
    unpruned = results[0]
    for result in results:
        times = np.asarray(result.times_ms)
        graphs = np.asarray(result.graph_per_step)
        result.overall = Latency.of(list(times))
        result.warmup = Latency.of(list(times[graphs == WARMUP]))
        result.steady = Latency.of(list(times[(graphs == PRUNED) | (graphs == STEP)]))
    base = unpruned.steady
    assert base is not None
    for result in results:
        steady = result.steady
        assert steady is not None
        result.rate_hz_p50, result.rate_hz_p99 = 1000 / steady.p50_ms, 1000 / steady.p99_ms
        result.speedup, result.speedup_p99 = base.p50_ms / steady.p50_ms, base.p99_ms / steady.p99_ms
        result.ideal_speedup = unpruned.step_flops / result.step_flops
        result.warmup_vs_unpruned = result.warmup.p50_ms / base.p50_ms if result.warmup else None
        result.episode_speedup = sum(unpruned.times_ms) / sum(result.times_ms)


def plot(results: list[Result], path: Path, model: str, steps: int, window: int, image_tokens: int) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    xs = np.arange(len(results))
    kinds = (
        ("warmup", "tab:orange", f"warm-up steps (first {window} of an episode, all {image_tokens} kept)"),
        ("steady", "tab:blue", "steady-state steps (pruned; unpruned: every step)"),
    )
    for offset, (kind, colour, name) in enumerate(kinds):
        labelled = False
        for x, result in zip(xs, results, strict=True):
            latency: Latency | None = getattr(result, kind)
            if latency is None:
                continue
            position = x + (offset - 0.5) * 0.36 if result.warmup is not None else x
            left.bar(position, latency.p50_ms, 0.34, color=colour, label=None if labelled else name)
            left.errorbar(
                position, latency.p50_ms, yerr=[[0], [latency.p99_ms - latency.p50_ms]], color="black", capsize=4
            )
            labelled = True
    left.set_xticks(xs, [r.label.replace(f"{METHOD}-", f"{METHOD}\nkeep ") for r in results], fontsize=8)
    left.set_ylabel("ms per control step (bar p50, whisker p99)")
    left.set_title(f"per-step latency ({steps} steps per episode)")
    left.legend(fontsize=8, loc="lower left")
    pruned = results[1:]
    px = np.arange(len(pruned))
    measured = right.bar(px - 0.2, [r.speedup for r in pruned], 0.4, label="measured, p50 (ORT CPU)")
    ideal = right.bar(px + 0.2, [r.ideal_speedup for r in pruned], 0.4, label="FLOPs ideal")
    for bars in (measured, ideal):
        right.bar_label(bars, fmt="%.2f×", fontsize=8)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(px, [f"keep {r.keep}" for r in pruned])
    right.set_ylabel("pruned step speedup over unpruned")
    right.set_title("steady-state step: measured vs FLOPs ideal")
    right.legend(fontsize=8)
    fig.suptitle(f"{model}: VLA-Pruner control steps in ONNX Runtime CPU, policies run side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(console: Console, model: str, results: list[Result], infos: list[ExportInfo]) -> None:
    table = Table(title=f"{model} control steps (ms per step; ONNX Runtime CPU)")
    columns = ("policy", "verified", "all p50/p99", "warm-up p50/p99", "steady p50/p99", "Hz at p50/p99")
    for column in (*columns, "speedup (ideal)", "episode speedup"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    verified = {info.label: info.verified for info in infos}

    def pair(latency: Latency | None, digits: int = 0) -> str:
        return "-" if latency is None else f"{latency.p50_ms:.{digits}f} / {latency.p99_ms:.{digits}f}"

    for r in results:
        table.add_row(
            r.label,
            str(verified[r.label]),
            pair(r.overall),
            pair(r.warmup),
            pair(r.steady),
            f"{r.rate_hz_p50:.2f} / {r.rate_hz_p99:.2f}",
            f"{r.speedup:.2f} ({r.ideal_speedup:.2f})",
            f"{r.episode_speedup:.2f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tpc-bench/openvla"), help="where the exports live")
    parser.add_argument("--force", action="store_true", help="re-export even when a verified export exists")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="control steps per episode")
    parser.add_argument("--warmup-episodes", type=int, default=1, help="untimed episodes first")
    parser.add_argument("--model", default=MODEL, help="a policy model (zoo:tiny-openvla for a quick smoke run)")
    parser.add_argument("--keeps", type=int, nargs="+", default=list(KEEPS))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    keeps = tuple(args.keeps)
    console = Console()
    if not console.is_terminal:
        console.width = 160  # a log file: the table would wrap at 80 columns
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with Progress(console=console) as progress:
        infos = export_all(args.model, keeps, args.work, args.force, console, progress)
    if not infos[0].verified:
        raise SystemExit(f"the unpruned baseline did not export: {infos[0].diagnosis}")
    timed = [(config, info) for config, info in zip(configurations(keeps), infos, strict=True) if info.verified]
    plans: dict[tuple[str, int | None], VlaPlan] = {config: plan(request(args.model, *config)) for config, _ in timed}
    base_plan = plans[("none", None)]
    pruner_plan = next((p for (method, _), p in plans.items() if method == METHOD), None)
    window = pruner_plan.method_params["window"] if pruner_plan else 0
    results = []
    for config, info in timed:
        the_plan, method = plans[config], config[0]
        warm = the_plan.flops(pruned=False)["step"] if the_plan.stateful else None
        step_flops = the_plan.flops()["step"]
        results.append(Result(info.label, method, the_plan.keep, list(the_plan.component_names), step_flops, warm))
    console.print(f"loading {len(timed)} policies into ONNX Runtime")
    policies = [Policy.load(info.directory) for _, info in timed]
    waited = wait_while_busy(console)
    load_before = os.getloadavg()
    with timing_flag(), Progress(console=console) as progress:
        timing_start = time.perf_counter()
        run_episodes(policies, results, base_plan, args.episodes, args.steps, args.warmup_episodes, progress)
        timing_s = time.perf_counter() - timing_start
    load_after = os.getloadavg()
    summarise(results)
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "what": (
            "per-step latency of Policy.step_result (preprocess + one ONNX graph + action decode), all policies "
            "in one process, each step of each episode run by every policy on the same frame in rotating order; "
            "p50/p99 by numpy.percentile (linear); steady = pruned steps (VLA-Pruner) or every step (unpruned); "
            "rate = 1000 / steady p50 (p99); speedup = unpruned steady p50 / steady p50; ideal = unpruned step "
            "FLOPs / pruned step FLOPs (VlaPlan.flops); episode speedup = ratio of summed step times"
        ),
        "config": {
            "method": METHOD,
            "keeps": list(keeps),
            "method_params": pruner_plan.method_params if pruner_plan else None,
            "image_tokens": base_plan.prompt.image_tokens,
            "text_tokens": base_plan.prompt.text_len,
            "prompt_positions": base_plan.prompt.length,
            "decoder_layers": base_plan.decoder.num_layers,
            "action_dim": base_plan.geometry.action_dim,
            "episodes": args.episodes,
            "steps_per_episode": args.steps,
            "untimed_episodes": args.warmup_episodes,
            "episode_seeds": list(range(args.episodes)),
            "export_verification": "run_verify=True, samples=1",
            "work": str(args.work),
        },
        "machine": {
            **machine(
                onnxruntime=onnxruntime.__version__,
                ort_threads="default (all cores)",
                omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"),
            ),
            "load_average_1min": {"before_timing": load_before[0], "after_timing": load_after[0]},
        },
        "waited_for_busy_s": round(waited, 1),
        "timing_phase_s": round(timing_s, 1),
        "total_s": round(time.time() - started, 1),
        "exports": [asdict(info) for info in infos],
        "results": [asdict(r) for r in results],
    }
    (args.output / "openvla_control.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.output / "openvla_control.png", args.model, args.steps, window, base_plan.prompt.image_tokens)
    print_table(console, args.model, results, infos)
    for info in infos:
        spent = "?" if info.export_s is None else f"{info.export_s:.0f}s"
        reused = " (reused)" if info.reused else ""
        console.print(
            f"{info.label}: export {spent}{reused}, {info.disk_mb:.0f} MB, verified {info.verified} {info.diagnosis}"
        )
    console.print(f"timing phase {timing_s:.0f}s; median unpruned step {statistics.median(results[0].times_ms):.0f} ms")


if __name__ == "__main__":
    main()
