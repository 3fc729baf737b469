"""Benchmark: what a pruning budget costs in top-1 accuracy on Fashion-MNIST, eager and exported (`tpc eval`).

Why this exists: a speedup is only worth its accuracy. For each trained testbed model and every pruning method
that applies to it, `tpc.evaluation.evaluate` runs the full test split (10000 images) at keep 1/2, 1/4 and 1/8 of
the visual tokens: the pruned model eager, the same request exported to ONNX Runtime and run there (its answers
must equal eager's on all but 0.1 % of the images; every disagreement is listed with both margins), and two
controls at the same budget, `random` (3 seeds, mean ± std) and `uniform`; "all" is the unpruned model.

  fmnist-vit     CLIPForImageClassification, 196 patch tokens: hiprune, divprune at keep 98, 49, 24
  fmnist-llava   that tower + projector + 4-layer Llama answering the class name: hiprune, divprune (vision side),
                 fastv, lvlm-csp (in the decoder) at keep 98, 49, 24; catp with a 1-shot prompt (an example image
                 and its class before the query: 392 image tokens) at keep 196, 98, 49, against its own unpruned
                 model and baselines in that prompt

  make bench-accuracy                 both models -> benchmarks/accuracy/<model>.{json,md,png}
  --models fmnist-vit                 one model (a local model directory too, for development: its architecture
                                      picks the methods)
  --limit 64                          the first N test images: a smoke run (then --output defaults to
                                      /tmp/tpc-bench/accuracy, never the results directory)
  --target none                       eager only, no exports
  --jobs 2                            the models in two processes side by side (one core each), logs beside the
                                      results
  --methods fastv,catp                rerun some methods: the other methods' reports in <model>.json are kept
  --summary-only                      rebuild <model>.md and <model>.png from the <model>.json files written

Eager predictions are cached per (model, dataset, run) under $TPC_CACHE_DIR/eval, so the unpruned model and the
baselines are computed once across the methods (and across reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import matplotlib
from machine import machine
from rich.console import Console

from tpc.evaluation import EvalOptions, evaluate, render
from tpc.evaluation.report import MAX_DISAGREEMENT
from tpc.progress import rich_steps

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "accuracy"
SCRATCH = Path("/tmp/tpc-bench/accuracy")  # a smoke run's or a local model's results
SCHEMA = "tpc-accuracy/1"
DATASET = "fashion-mnist"
FRACTIONS = (Fraction(1, 2), Fraction(1, 4), Fraction(1, 8))
SHOWN_DISAGREEMENTS = 20  # per budget in the .md (the .json has them all)


@dataclass(frozen=True)
class Method:
    name: str
    tokens: int  # the image tokens its keeps count (both images of a 1-shot prompt for catp)
    params: dict[str, str] = field(default_factory=dict)
    prompt: str = "single"  # the prompt: methods sharing one share the unpruned model and the baselines

    def keeps(self) -> tuple[int, ...]:
        return tuple(int(self.tokens * fraction) for fraction in FRACTIONS)


VIT = (Method("hiprune", 196), Method("divprune", 196))
LLAVA = (
    *VIT,
    Method("fastv", 196),
    Method("lvlm-csp", 196),
    Method("catp", 392, {"shots": "1"}, prompt="1-shot"),
)
MODELS = {"fmnist-vit": VIT, "fmnist-llava": LLAVA}
PROMPTS = {
    "single": "one image per query",
    "1-shot": "catp's 1-shot prompt: an example image and its class, then the query",
}


def methods_of(model: str) -> tuple[Method, ...]:
    """The zoo model's methods, or a local directory's by its architecture (a CLIP classifier or a LLaVA)."""
    if model in MODELS:
        return MODELS[model]
    config = Path(model) / "config.json"
    if not config.exists():
        raise SystemExit(f"unknown model {model!r}: give one of {', '.join(MODELS)} or a model directory")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type == "llava":
        return LLAVA
    if model_type == "clip":
        return VIT
    raise SystemExit(f"{model}: model_type {model_type!r}; this benchmark knows clip (a classifier) and llava")


def name_of(model: str) -> str:
    """The results' file name: the zoo name, or a local directory's own name."""
    return model if model in MODELS else Path(model).resolve().name


def reference(model: str) -> str:
    return f"zoo:{model}" if model in MODELS else str(Path(model).resolve())


# --- running ----------------------------------------------------------------------------------------------------


def run_model(model: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Every method of the model (or those of --methods) through `evaluate`, one after another, the results file
    rewritten after each; a method that raises is recorded under "errors" and the next one runs."""
    started = time.perf_counter()
    path = args.output / f"{name_of(model)}.json"
    methods = [m for m in methods_of(model) if not args.methods or m.name in args.methods]
    earlier: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    if args.methods and path.exists():  # a rerun of some methods keeps the others' reports
        previous = json.loads(path.read_text())
        earlier = {r["method"]: r for r in previous.get("reports", []) if r["method"] not in args.methods}
        seconds = {m: s for m, s in previous.get("seconds", {}).items() if m in earlier}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": reference(model),
        "name": name_of(model),
        "what": "tpc eval per method: top-1 on the Fashion-MNIST test split at keep 1/2, 1/4, 1/8 of the image "
        "tokens, eager and exported, against random (mean ± std over seeds) and uniform at the same budget and "
        "the unpruned model",
        "command": shlex.join(["python", *sys.argv]),
        "limit": args.limit,
        "target": args.target,
        "machine": machine(),
        "seconds": seconds,
        "total_s": 0.0,
        "errors": {},
        "reports": [],
    }
    fresh: dict[str, Any] = {}
    for method in methods:
        console.rule(f"{name_of(model)}: {method.name} at keep {', '.join(map(str, method.keeps()))}")
        options = EvalOptions(
            model=reference(model),
            dataset=DATASET,
            method=method.name,
            keeps=method.keeps(),
            target=args.target,
            params=dict(method.params),
            split="test",
            batch_size=args.batch_size,
            seeds=args.seeds,
            limit=args.limit,
        )
        start = time.perf_counter()
        try:
            report = evaluate(options, console=console, step=rich_steps(console))
        except Exception as error:  # the other methods still run; the error is in the results and the exit code
            console.print_exception(max_frames=8)
            result["errors"][method.name] = f"{type(error).__name__}: {error}"
            continue
        finally:
            result["seconds"][method.name] = round(time.perf_counter() - start, 1)
        render(report, console)
        fresh[method.name] = {**report.to_json(), "prompt": method.prompt}
        result["reports"] = [
            fresh.get(m.name) or earlier[m.name] for m in methods_of(model) if m.name in fresh or m.name in earlier
        ]
        result["total_s"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")
    result["total_s"] = round(time.perf_counter() - started, 1)
    if result["reports"] or result["errors"]:
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def child_command(model: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--models", model, "--output", str(args.output)]
    command += ["--target", args.target or "none", "--batch-size", str(args.batch_size), "--seeds", str(args.seeds)]
    command += ["--methods", ",".join(sorted(args.methods))] if args.methods else []
    command += ["--threads", str(args.threads or 1)]  # one core each: two processes of 2 threads thrash 2 cores
    return command + (["--limit", str(args.limit)] if args.limit else [])


def run_parallel(models: list[str], args: argparse.Namespace, console: Console) -> int:
    """Each model in its own process (`--models X`), `--jobs` at a time, each logging beside the results."""
    waiting, running, failed = list(models), [], []
    while waiting or running:
        while waiting and len(running) < args.jobs:
            model = waiting.pop(0)
            log = args.output / f"{name_of(model)}.log"
            handle = log.open("w")
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
            process = subprocess.Popen(child_command(model, args), stdout=handle, stderr=subprocess.STDOUT, env=env)
            running.append((model, process, handle, log, time.perf_counter()))
            console.print(f"{name_of(model)}: started (pid {process.pid}), log {log}")
        time.sleep(2)
        for item in list(running):
            model, process, handle, log, start = item
            if process.poll() is None:
                continue
            handle.close()
            running.remove(item)
            elapsed = time.perf_counter() - start
            if process.returncode:
                failed.append(model)
                console.print(f"[red]{name_of(model)}: exit {process.returncode} after {elapsed:.0f}s; see {log}[/red]")
            else:
                console.print(f"{name_of(model)}: done in {elapsed:.0f}s")
    return 1 if failed else 0


# --- the summary: markdown and figure -----------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def fraction(keep: int, tokens: int) -> str:
    """The nominal share: 24 of 196 is the 1/8 budget."""
    return str(Fraction(keep, tokens).limit_denominator(8))


def groups(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The reports by prompt: methods in one prompt share the unpruned model and the baselines."""
    out: dict[str, list[dict[str, Any]]] = {}
    for report in result["reports"]:
        out.setdefault(report.get("prompt", "single"), []).append(report)
    return out


def headline(reports: list[dict[str, Any]]) -> list[str]:
    """Method × keep {all, 1/2, 1/4, 1/8}: eager accuracy (retention); the baselines of the first report below."""
    first = reports[0]
    tokens = first["tokens"]
    keeps = sorted((row["keep"] for row in first["keeps"]), reverse=True)
    cells = [f"all ({tokens})", *(f"{fraction(k, tokens)} ({k})" for k in keeps)]
    lines = ["| method | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    unpruned = f"{first['unpruned']['accuracy'] * 100:.2f}"
    for report in reports:
        by_keep = {row["keep"]: row for row in report["keeps"]}
        row = [f"{by_keep[k]['eager']['accuracy'] * 100:.2f} ({by_keep[k]['eager']['retention']:.3f})" for k in keeps]
        lines.append(f"| {report['method']} | {unpruned} | " + " | ".join(row) + " |")
    by_keep = {row["keep"]: row for row in first["keeps"]}
    seeds = len(first["keeps"][0]["random"]["seeds"])
    spread = [f"{by_keep[k]['random']['mean'] * 100:.2f} ± {by_keep[k]['random']['std'] * 100:.2f}" for k in keeps]
    lines.append(f"| random ({seeds} seeds, mean ± std) | {unpruned} | " + " | ".join(spread) + " |")
    uniform = [f"{by_keep[k]['uniform']['accuracy'] * 100:.2f}" for k in keeps]
    lines.append(f"| uniform | {unpruned} | " + " | ".join(uniform) + " |")
    return lines


def detail(reports: list[dict[str, Any]]) -> list[str]:
    """Every figure per method and budget: eager, retention, exported and its agreement, the baselines."""
    target = next((r["target"] for r in reports if r["target"]), None)
    columns = ["method", "keep", "accuracy", "retention"]
    columns += [f"{target} accuracy", "agreement (differ / near-ties)"] if target else []
    columns += ["random mean ± std", "random retention", "uniform", "uniform retention"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for report in reports:
        tokens = report["tokens"]
        lines.append(
            f"| {report['method']} | all ({tokens}) | {percent(report['unpruned']['accuracy'])} | 1.000 |"
            + (" | |" if target else "")
            + " | | | |"
        )
        for row in sorted(report["keeps"], key=lambda row: -row["keep"]):
            cells = [report["method"], f"{fraction(row['keep'], tokens)} ({row['keep']})"]
            cells += [percent(row["eager"]["accuracy"]), f"{row['eager']['retention']:.3f}"]
            exported = row["exported"]
            if target and exported:
                listed = exported["disagreements"]
                ties = sum(d["near_tie"] for d in listed)
                mark = "" if exported["within_tolerance"] else " **drift**"
                cells += [percent(exported["accuracy"]["accuracy"]), f"{percent(exported['agreement'])} "]
                cells[-1] += f"({len(listed)} / {ties}){mark}"
            elif target:
                cells += ["-", "-"]
            random = row["random"]
            cells += [f"{random['mean'] * 100:.2f} ± {random['std'] * 100:.2f} %", f"{random['retention']:.3f}"]
            cells += [percent(row["uniform"]["accuracy"]), f"{row['uniform']['retention']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def disagreements(reports: list[dict[str, Any]]) -> list[str]:
    """Each image the export answered differently from eager, with both margins (best minus runner-up)."""
    lines = []
    for report in reports:
        for row in sorted(report["keeps"], key=lambda row: -row["keep"]):
            exported = row["exported"]
            if not exported or not exported["disagreements"]:
                continue
            listed = exported["disagreements"]
            images = report["dataset"]["images"]
            lines.append(
                f"- {report['method']} keep {row['keep']}: {len(listed)} of {images} images "
                f"(tolerance {MAX_DISAGREEMENT * images:.0f}), {sum(d['near_tie'] for d in listed)} near-ties"
            )
            for d in listed[:SHOWN_DISAGREEMENTS]:
                tie = ", near-tie" if d["near_tie"] else ""
                lines.append(
                    f"  - image {d['index']}: label {d['label']}, eager {d['eager']} (margin {d['eager_margin']:.3g}),"
                    f" exported {d['exported']} (margin {d['exported_margin']:.3g}){tie}"
                )
            if len(listed) > SHOWN_DISAGREEMENTS:
                lines.append(f"  - ... {len(listed) - SHOWN_DISAGREEMENTS} more in the .json")
    return lines


def markdown(result: dict[str, Any]) -> str:
    reports = result["reports"]
    first = reports[0]
    data = first["dataset"]
    name = result["name"]
    exported = f" and exported to {result['target']}" if result["target"] else " only (no exports)"
    lines = [
        f"# {name}: top-1 accuracy under visual-token pruning",
        "",
        f"`{result['model']}` on {data['name']} ({data['split']}, {data['images']} images, {len(data['classes'])} "
        f"classes); eager PyTorch{exported}; written by "
        f"`benchmarks/accuracy.py` in {result['total_s'] / 60:.1f} min on {describe(result['machine'])}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    notes = sorted({note for report in reports for note in report.get("notes", [])})
    notes += [f"**{method} failed**: {error}" for method, error in result.get("errors", {}).items()]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    for prompt, mine in groups(result).items():
        lines += [f"## {PROMPTS.get(prompt, prompt)}", ""]
        lines += ["Eager top-1 accuracy % (retention = accuracy / unpruned); baselines at the same budget:", ""]
        lines += [*headline(mine), ""]
        split = [row for row in mine[0]["keeps"] if row.get("baseline_keep", row["keep"]) != row["keep"]]
        if split:
            per_image = ", ".join(f"{row['keep']}: {row['baseline_keep']}" for row in split)
            lines += [f"The baselines keep their budget per image of the prompt (keep: per image): {per_image}.", ""]
        lines += ["Every figure:", "", *detail(mine), ""]
    listed = disagreements(reports)
    drifted = [
        f"{r['method']} keep {row['keep']}"
        for r in reports
        for row in r["keeps"]
        if row["exported"] and not row["exported"]["within_tolerance"]
    ]
    if result["target"]:
        lines += ["## Exported against eager", ""]
        verdict = "every budget within" if not drifted else f"**over** it: {', '.join(drifted)};"
        lines += [f"Tolerance: at most {MAX_DISAGREEMENT:.1%} of the images answered differently; {verdict}.", ""]
        lines += (listed or ["No image answered differently."]) + [""]
    lines += [f"![{name}]({name}.png)", ""]
    return "\n".join(lines)


def describe(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB; "
        f"torch {machine.get('torch')}, transformers {machine.get('transformers')}"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs kept tokens per prompt (one panel each): a line per method, random's band, uniform, unpruned."""
    panels = groups(result)
    figure, axes_list = plt.subplots(1, len(panels), figsize=(6.6 * len(panels), 4.6), dpi=110, squeeze=False)
    for axes, (prompt, reports) in zip(axes_list[0], panels.items(), strict=True):
        first = reports[0]
        unpruned = 100 * first["unpruned"]["accuracy"]
        axes.axhline(unpruned, color="black", linestyle="--", linewidth=1, label=f"unpruned ({unpruned:.2f} %)")
        for index, report in enumerate(reports):
            rows = sorted(report["keeps"], key=lambda row: row["keep"])
            keeps = [row["keep"] for row in rows]
            colour = f"C{index}"
            axes.plot(keeps, [100 * r["eager"]["accuracy"] for r in rows], "o-", color=colour, label=report["method"])
            exported = [(r["keep"], 100 * r["exported"]["accuracy"]["accuracy"]) for r in rows if r["exported"]]
            if exported:
                axes.plot(*zip(*exported, strict=True), "x", color=colour, markersize=10)
        rows = sorted(first["keeps"], key=lambda row: row["keep"])
        keeps = [row["keep"] for row in rows]
        mean = [100 * r["random"]["mean"] for r in rows]
        std = [100 * r["random"]["std"] for r in rows]
        seeds = len(rows[0]["random"]["seeds"])
        axes.plot(keeps, mean, "s-", color="tab:gray", label=f"random (mean ± std, {seeds} seeds)")
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axes.fill_between(keeps, low, high, color="tab:gray", alpha=0.25)
        axes.plot(keeps, [100 * r["uniform"]["accuracy"] for r in rows], "^-", color="black", label="uniform")
        if first["target"]:  # a legend entry for the exported markers drawn in each method's colour
            axes.plot([], [], "x", color="dimgray", markersize=10, label=f"exported to {first['target']} (×)")
        axes.set_xscale("log", base=2)
        axes.set_xticks(keeps, [f"{k}\n{fraction(k, first['tokens'])}" for k in keeps])
        axes.minorticks_off()
        axes.set_xlabel(f"image tokens kept (of {first['tokens']})")
        axes.set_ylabel("top-1 accuracy (%)")
        data = first["dataset"]
        title = f"{result['name']}: {data['name']} {data['split']}, {data['images']} images"
        axes.set_title(f"{title}\n{PROMPTS.get(prompt, prompt)}" if len(panels) > 1 else title, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def summarise(path: Path, console: Console) -> None:
    result = json.loads(path.read_text())
    if not result["reports"]:
        console.print(f"[red]{result['name']}: no method ran ({result.get('errors')}); nothing to summarise[/red]")
        return
    markdown_path, figure_path = path.with_suffix(".md"), path.with_suffix(".png")
    markdown_path.write_text(markdown(result))
    plot(result, figure_path)
    console.print(f"{result['name']}: {path}, {markdown_path}, {figure_path}")


# --- main ---------------------------------------------------------------------------------------------------------


def ours(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="fmnist-vit,fmnist-llava (default both) or model directories")
    parser.add_argument("--target", default="onnx", help="export target of each budget, or none (default onnx)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images (a smoke run)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call, the exports' static batch")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the random baseline")
    parser.add_argument("--output", type=Path, default=None, help=f"results directory (default {RESULTS})")
    parser.add_argument("--methods", help="only these methods (comma-separated); the others' reports are kept")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel processes (2: one per core)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's; --jobs: 1)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild .md and .png from the .json files")
    args = parser.parse_args()
    args.target = None if args.target == "none" else args.target
    args.methods = set(args.methods.split(",")) if args.methods else set()
    models = args.models.split(",") if args.models else list(MODELS)
    known = {method.name for model in models for method in methods_of(model)}  # an unknown model fails here
    if args.methods - known:
        raise SystemExit(f"unknown method(s) {sorted(args.methods - known)}; these models have {sorted(known)}")
    if args.output is None:
        full = args.limit is None and all(model in MODELS for model in models)
        args.output = RESULTS if full or args.summary_only else SCRATCH
    args.output.mkdir(parents=True, exist_ok=True)
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # a log file: rich's tables at a readable width instead of 80 columns
        console = Console(soft_wrap=True, width=140)

    if args.summary_only:
        paths = [args.output / f"{name_of(model)}.json" for model in models] if args.models else []
        paths = paths or sorted(p for p in args.output.glob("*.json") if ours(p))
        missing = [str(p) for p in paths if not p.exists()]
        if missing or not paths:
            raise SystemExit(f"no results to summarise: {', '.join(missing) or args.output}")
        for path in paths:
            summarise(path, console)
        return

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    status = 0
    if args.jobs > 1 and len(models) > 1:
        status = run_parallel(models, args, console)
        written = [args.output / f"{name_of(m)}.json" for m in models]
        for path in written:
            if path.exists():
                summarise(path, console)
    else:
        for model in models:
            result = run_model(model, args, console)
            path = args.output / f"{name_of(model)}.json"
            console.print(f"{name_of(model)}: {len(result['reports'])} methods in {result['total_s']:.0f}s")
            summarise(path, console)
            for method, error in result["errors"].items():
                console.print(f"[red]{name_of(model)} {method} failed: {error}[/red]")
                status = 1
            drifted = [
                f"{r['method']} keep {row['keep']}"
                for r in result["reports"]
                for row in r["keeps"]
                if row["exported"] and not row["exported"]["within_tolerance"]
            ]
            if drifted:
                console.print(f"[red]{name_of(model)}: the export drifts from eager past 0.1 %: {drifted}[/red]")
                status = 1
    console.print(f"results in {args.output} ({time.perf_counter() - started:.0f}s)")
    raise SystemExit(status)


if __name__ == "__main__":
    main()
