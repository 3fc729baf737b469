"""The `tpc` command line. Thin: parse, call the library, render; every failure of input is one line + exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException  # base of typer's (vendored click) usage errors

from tpc.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="tpc, the token-pruning compiler: keep K visual tokens, export, verify against eager, profile.",
)
out = Console()
err = Console(stderr=True)

EXIT_USAGE, EXIT_MISMATCH = 2, 1


def _quiet_libraries() -> None:
    """Nothing is ever downloaded, and library chatter would bury tpc's own report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--param expects NAME=VALUE, got '{item}'")
        params[name.strip()] = value.strip()
    return params


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _render_verify(report: Any) -> None:
    atol = f"{report.atol} x max|eager|" if report.atol_scaled_by_max else f"{report.atol}"
    table = Table(title=f"verify: {report.runtime}, {report.samples} samples (atol {atol}, rtol {report.rtol})")
    for column in ("check", "max abs", "max rel", "ok"):
        table.add_column(column)
    agree = report.kept_rows_agreeing == report.kept_rows
    table.add_row("kept_indices equal", "", "", f"{report.kept_rows_agreeing}/{report.kept_rows} {_mark(agree)}")
    for prefix, diffs in (("", report.outputs), ("teacher-forced ", report.teacher_forced)):
        for name, diff in _group_cache(diffs).items():
            table.add_row(f"{prefix}{name}", f"{diff.max_abs:.3g}", f"{diff.max_rel:.3g}", _mark(diff.passed))
    if report.generation is not None:
        g = report.generation
        label = f"greedy generation, {g.new_tokens} tokens x {g.samples} prompts"
        table.add_row(label, "", "", f"{g.rows_equal}/{g.rows} rows equal {_mark(g.passed)}")
    if report.episode is not None:
        e = report.episode
        table.add_row(
            f"episodes, {e.episodes} x {e.steps} steps: kept tokens + actions", "", "", f"{e.steps_agreeing}/"
            f"{e.total_steps} steps equal {_mark(e.steps_agreeing == e.total_steps)}",
        )  # fmt: skip
        if e.history is not None:
            h = e.history
            table.add_row("episodes: carried history", f"{h.max_abs:.3g}", f"{h.max_rel:.3g}", _mark(h.passed))
    out.print(table)
    out.print(("[green]PASS[/green] " if report.passed else "[red]FAIL[/red] ") + report.diagnosis)


def _render_policy_plan(plan: dict[str, Any]) -> None:
    tokens, prompt = plan["tokens"], plan["prompt"]
    out.print(f"[bold]{plan['model']}[/bold] ({plan['family']} policy): method {plan['method']}, {plan['params']}")
    out.print(f"prune point: {plan['prune_point']}")
    for tap in plan["taps"]:
        out.print(f"  tap decoder layer {tap['layer']}: {tap['reduction']}")
    out.print(
        f"prompt: BOS + {prompt['image_tokens']} image tokens + {prompt['text_tokens'] - 1} text tokens; "
        f"image tokens {tokens['before']} -> {tokens['after']}; decoder lengths {plan['decoder_lengths']['pruned']}"
    )
    out.print(f"graphs: {plan['graphs']}")
    if plan["state"]:
        out.print(f"state carried between steps: {plan['state']}")
    full, pruned = plan["flops"]["unpruned"], plan["flops"]["pruned"]
    for stage in ("towers", "projector", "prefill", "decode", "step"):
        out.print(f"  {stage} GFLOPs: {full[stage] / 1e9:.3f} unpruned -> {pruned[stage] / 1e9:.3f}")
    out.print(f"FLOPs-ideal speedup per step: {plan['ideal_speedup']['step']:.2f}x")


def _render_export(directory: Path, json_path: Path | None) -> None:
    from tpc.inspect import describe_export

    info = describe_export(directory)
    _write_json(json_path, info)
    tokens = info["tokens"]
    out.print(
        f"[bold]{directory}[/bold]: {info['model']}, {info['method']} keep {info['keep']} -> {info['target']} "
        f"({info['dtype']}); visual tokens {tokens['before']} -> {tokens['after']}"
    )
    verification = info["verification"] or {}
    if verification.get("skipped"):
        out.print(f"verification: skipped ({verification['skipped']})", soft_wrap=True)
    elif verification:
        out.print(f"verification: {'passed' if verification.get('passed') else 'FAILED'}")
    for component in info["components"]:
        where = f"{component['artifact']}" + (f" method {component['method']}" if component["method"] else "")
        out.print(f"\n[bold]{component['name']}[/bold] ({where})")
        out.print(f"  inputs {component['inputs']}\n  outputs {component['outputs']}", soft_wrap=True)
        graph = component["graph"]
        if "delegation" in graph:
            _render_delegation(graph["delegation"])
        for key, title in (("mil_ops", "MIL ops"), ("op_counts", "ONNX ops")):
            if key in graph:
                out.print(f"  {title}: " + ", ".join(f"{op} {n}" for op, n in graph[key].items()), soft_wrap=True)
        if graph.get("neural_engine"):
            out.print(f"  off the Neural Engine: {graph['neural_engine']}", soft_wrap=True)


def _render_delegation(report: dict[str, Any]) -> None:
    out.print(
        f"  {report['backend']}: {report['islands']} islands, {report['delegated_nodes']} nodes delegated, "
        f"{report['portable_nodes']} portable ({report['portable_segments']} portable runs, "
        f"{report['select_segments']} holding a select); {report['delegated_flops_share']:.1%} of FLOPs delegated"
    )
    table = Table(show_edge=False, pad_edge=False)
    for column in ("op", "delegated", "portable", "why portable"):
        table.add_column(column, no_wrap=column != "why portable")
    for op, row in report["ops"].items():
        table.add_row(op, str(row["delegated"]), str(row["portable"]), "; ".join(row["why"]))
    out.print(table)


def _group_cache(diffs: dict[str, Any]) -> dict[str, Any]:
    """One row for a component's whole KV cache (`prefill.present.*`), its worst layer's numbers."""
    grouped: dict[str, Any] = {}
    for name, diff in diffs.items():
        component, dot, _ = name.partition(".present.")
        key = f"{component}.present.* (KV cache)" if dot else name
        grouped[key] = diff.worst(grouped.get(key))
    return grouped


def _mark(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="local Hugging Face model directory, or zoo:NAME")],
    method: Annotated[str, typer.Option(help="pruning method (see `tpc methods`); none = unpruned baseline")],
    output: Annotated[Path, typer.Option(help="export directory to create")],
    keep: Annotated[int | None, typer.Option(help="number of visual tokens to keep (K)")] = None,
    target: Annotated[str, typer.Option(help="onnx | tensorrt | executorch | coreml")] = "onnx",
    param: Annotated[
        list[str] | None,
        typer.Option(help="method/model parameter NAME=VALUE (repeatable); tensorrt: trt_select=native|plugin"),
    ] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16")] = "fp32",
    prompt_len: Annotated[
        int | None, typer.Option(help="VLMs: text tokens of the static prompt (default: the chat template's)")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="VLMs: tokens the static KV cache has room for (default 32)")
    ] = None,
    batch: Annotated[int, typer.Option(help="static batch size of the exported graph")] = 1,
    samples: Annotated[int, typer.Option(help="inputs compared by the verification")] = 4,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output directory")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the eager-vs-export check")] = False,
    compute_units: Annotated[
        str | None, typer.Option(help="coreml: all | cpu_and_gpu | cpu_only | cpu_and_ne (default all)")
    ] = None,
    bundle: Annotated[
        bool, typer.Option("--bundle", help="executorch: also write bundle/ for executor_runner and benchmark apps")
    ] = False,
) -> None:
    """Prune MODEL to KEEP visual tokens with METHOD, export it for TARGET, and verify it against eager."""
    from tpc.exporter import PARAM_OPTIONS
    from tpc.exporting import export as run_export
    from tpc.pipeline import PruneRequest
    from tpc.progress import rich_steps

    params = _parse_params(param or [])
    options = {name: params.pop(name) for name in list(params) if name in PARAM_OPTIONS}
    if compute_units is not None:
        options["compute_units"] = compute_units
    request = PruneRequest(model, method, keep, params, dtype, batch, prompt_len, max_new_tokens)
    result = run_export(request, target, output, force, not no_verify, samples, rich_steps(err), options, bundle=bundle)
    if result.report is not None:
        _render_verify(result.report)
    if result.skipped is not None:
        out.print(f"[yellow]runtime check skipped[/yellow]: {result.skipped}", soft_wrap=True)
    manifest = result.manifest
    tokens = manifest.tokens
    parts = ", ".join(dict.fromkeys(c.artifact for c in manifest.components))
    out.print(
        f"wrote {result.directory} ({parts}: {tokens['before']} -> {tokens['after']} visual tokens, "
        f"pruned at the {tokens['stage']} stage, {target})"
    )


@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(help="a directory written by `tpc export`")],
    samples: Annotated[int, typer.Option(help="number of seeded inputs (the first is samples/inputs.npz)")] = 4,
    inputs: Annotated[Path | None, typer.Option(help=".npz of your own inputs, keyed by input name")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
    allow_skip: Annotated[
        bool,
        typer.Option("--allow-skip", help="exit 0 when the runtime cannot run here (Core ML off macOS), saying so"),
    ] = False,
) -> None:
    """Run the export in its runtime and compare with eager PyTorch; exit 1 if they differ."""
    from tpc.errors import RuntimeUnavailable
    from tpc.progress import rich_steps
    from tpc.verification import skipped_verification
    from tpc.verification import verify as run_verify

    try:
        report = run_verify(directory, samples, inputs, step=rich_steps(err))
    except RuntimeUnavailable as unavailable:
        if not allow_skip:
            raise
        out.print(f"[yellow]SKIPPED[/yellow] {unavailable}", soft_wrap=True)
        _write_json(json_path, skipped_verification(str(unavailable)))
        return
    _render_verify(report)
    _write_json(json_path, report.to_dict())
    if not report.passed:
        raise typer.Exit(EXIT_MISMATCH)


@app.command()
def profile(
    directory: Annotated[Path, typer.Argument(help="a directory written by `tpc export`")],
    runs: Annotated[int, typer.Option(help="timed runs")] = 50,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 5,
    baseline: Annotated[Path | None, typer.Option(help="another export, timed alternately with this one")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
    etdump: Annotated[
        Path | None, typer.Option(help="executorch: read this ETDump recorded on a device instead of timing here")
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="--etdump: the method it recorded (default: the file's stem, else the first)")
    ] = None,
    tick_ns: Annotated[float, typer.Option(help="--etdump: nanoseconds per ETDump tick")] = 1.0,
) -> None:
    """Latency of an export in its runtime (median, p90), and the speedup over a baseline export."""
    from tpc.profiling import profile as run_profile

    if etdump is not None:
        _render_etdump(directory, etdump, method, tick_ns, json_path)
        return

    report = run_profile(directory, runs, warmup, baseline)
    table = Table(title=f"profile: {report.runtime} on {report.machine}")
    for column in ("export", "graph", "median ms", "p90 ms", "min ms", "runs"):
        table.add_column(column)
    headlines = {"prefill": "vision + prefill (first token)", "pruned": "control step (pruned)", "step": "control step"}
    headline = next((label for part, label in headlines.items() if part in report.components), "model")
    rows = [(report.directory, headline, report.timing)]
    if len(report.components) > 1:
        rows += [(report.directory, name, t) for name, t in report.components.items()]
    if report.baseline is not None:
        rows.append((f"{report.baseline_directory} (baseline)", headline, report.baseline))
        if len(report.baseline_components or {}) > 1:
            base = f"{report.baseline_directory} (baseline)"
            rows += [(base, name, t) for name, t in (report.baseline_components or {}).items()]
    for directory, graph, t in rows:
        table.add_row(directory, graph, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.min_ms:.3f}", str(t.runs))
    out.print(table)
    if report.speedup is not None:
        out.print(f"speedup over baseline: {report.speedup:.2f}x (median, measured side by side)")
    _write_json(json_path, report.to_dict())


def _render_etdump(directory: Path, etdump: Path, method: str | None, tick_ns: float, json_path: Path | None) -> None:
    from tpc.etdump import etdump_report

    report = etdump_report(directory, etdump, method, tick_ns)
    runs = f", {report.runs} runs, median {report.median_run_ms:.3f} ms" if report.median_run_ms is not None else ""
    table = Table(title=f"ETDump {report.etdump}: method {report.method}{runs}")
    for column in ("operator", "kind", "calls", "total ms", "median ms", "share"):
        table.add_column(column)
    for row in report.operators:
        share = f"{row.share:.1%}" if row.kind != "other" else ""
        table.add_row(row.name, row.kind, str(row.calls), f"{row.total_ms:.3f}", f"{row.median_ms:.4f}", share)
    out.print(table)
    _write_json(json_path, report.to_dict())


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="zoo:NAME or a model directory (the plan), or an export directory")],
    method: Annotated[str, typer.Option(help="pruning method")] = "hiprune",
    keep: Annotated[int | None, typer.Option(help="visual tokens to keep (default: a quarter of them)")] = None,
    param: Annotated[list[str] | None, typer.Option(help="NAME=VALUE (repeatable)")] = None,
    batch: Annotated[int, typer.Option(help="batch size")] = 1,
    prompt_len: Annotated[int | None, typer.Option(help="VLMs: text tokens of the static prompt")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the plan as JSON")] = None,
) -> None:
    """The plan: taps, prune point, tokens and FLOPs before/after (reads the config only); for an export
    directory, its components, shapes and the target's report (ExecuTorch delegation, Core ML ops)."""
    from tpc.exporter.manifest import MANIFEST_FILE
    from tpc.inspect import describe
    from tpc.pipeline import PruneRequest

    if (Path(model) / MANIFEST_FILE).is_file():
        _render_export(Path(model), json_path)
        return

    request = PruneRequest(model, method, keep, _parse_params(param or []), "fp32", batch, prompt_len)
    plan = describe(request)
    _write_json(json_path, plan)
    if plan.get("kind") == "policy":
        _render_policy_plan(plan)
        return
    g = plan["geometry"]
    out.print(
        f"[bold]{plan['model']}[/bold] ({plan['family']}): {g['layers']} layers, d={g['hidden_size']}, "
        f"{g['heads']} heads, {g['image_size']}px / {g['patch_size']} -> {g['grid'][0]}x{g['grid'][1]} patches"
        f" + {g['prefix_tokens']} prefix"
    )
    out.print(f"method {plan['method']}, params {plan['params']}")
    for tap in plan["taps"]:
        out.print(
            f"  tap layer {tap['layer']}: {tap['reduction']}; {tap['rows_per_block']} query rows per block, "
            f"{tap['block_bytes'] / 2**20:.1f} MiB per block"
        )
    if plan["taps"]:
        mib = plan["output_attentions_bytes"] / 2**20
        out.print(f"  (asking for output_attentions would hold {mib:.1f} MiB of maps)")
    out.print(f"prune point: {plan['prune_point']}; the vision graph runs {plan['layers_run']} of {g['layers']} layers")
    tokens, flops = plan["tokens"], plan["flops"]
    out.print(
        f"tokens: {tokens['before']} -> {tokens['after']} ({plan['downstream_token_ratio']:.1%} handed downstream)"
    )
    if "prompt" not in plan:
        out.print(
            f"encoder GFLOPs: {flops['encoder_full'] / 1e9:.3f} full -> {flops['pruned_graph'] / 1e9:.3f} pruned graph"
        )
    else:
        for tap in plan["prefill_taps"]:
            out.print(f"  tap decoder layer {tap['layer']}: {tap['reduction']}")
        prompt = plan["prompt"]
        out.print(
            f"prompt: {prompt['text_tokens']} text tokens, image at {prompt['image_start']}; the prefill sees "
            f"{plan['prefill_length']} positions; KV cache capacity per layer {plan['cache_capacity']}"
        )
        pruned, full = flops["pruned"], flops["unpruned"]
        for stage in ("tower", "projector", "prefill", "decode_token"):
            out.print(f"  {stage} GFLOPs: {full[stage] / 1e9:.3f} unpruned -> {pruned[stage] / 1e9:.3f}")
        ideal = plan["ideal_speedup"]
        out.print(f"FLOPs-ideal speedup: first token {ideal['first_token']:.2f}x, decode {ideal['decode_token']:.2f}x")


@app.command()
def methods() -> None:
    """The methods and the model families each applies to."""
    from tpc.methods import REGISTRY
    from tpc.models_zoo import FAMILIES

    table = Table(title="methods")
    for column in ("method", "stage", "families", "parameters", "what it keeps", "reference"):
        table.add_column(column, no_wrap=column in ("method", "stage"))
    for method in REGISTRY.values():
        families = ", ".join(name for name, adapter in FAMILIES.items() if adapter.accepts(method))
        params = ", ".join(f"{p.name}={p.default}" for p in method.params) or "-"
        table.add_row(method.name, method.stage, families, params, method.summary, method.reference)
    out.print(table)


@app.command()
def zoo() -> None:
    """The built-in models (random-initialised, architecture-faithful)."""
    from tpc.models_zoo import FAMILIES, ZOO

    table = Table(title="zoo (use as zoo:NAME)")
    for column in ("name", "family", "tokens", "layers", "description"):
        table.add_column(column)
    for entry in ZOO.values():
        geometry = FAMILIES[entry.family].geometry(entry.make_config())
        tokens = f"{geometry.num_patches} + {geometry.prefix_tokens}"
        table.add_row(entry.name, entry.family, tokens, str(geometry.num_layers), entry.summary)
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage problems -> `error: ...` on one line and exit 2; a failed verification -> exit 1."""
    from tpc.exporting import VerificationFailed

    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
    except (UsageError, TyperException) as error:
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return EXIT_USAGE
    except VerificationFailed as failure:
        _render_verify(failure.report)
        err.print("error: the export does not match eager PyTorch; nothing was written (see the table above)")
        return EXIT_MISMATCH
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
