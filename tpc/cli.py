"""The `tpc` command line. Thin: parse, call the library, render; every failure of input is one line + exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperOption
from typer.exceptions import TyperException  # base of typer's (vendored click) usage errors

from tpc.contract.names import MANIFEST_FILE
from tpc.errors import RuntimeUnavailable, UsageError, VerificationFailed
from tpc.flows import flow
from tpc.kinds import accepts_method
from tpc.methods import REGISTRY
from tpc.models_zoo import FAMILY_KINDS, ZOO
from tpc.progress import rich_steps


def _plain_argument_help() -> None:
    """Show arguments as click does (`tpc export [OPTIONS] MODEL`, `MODEL  local ... directory`), not typer 0.29's
    `{MODEL}` with a `<str>` type: the metavar already says what to pass."""
    from typer.core import TyperArgument

    def usage_name(self: TyperArgument) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]


_plain_argument_help()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="tpc, the token-pruning compiler: keep K visual tokens, export, verify against eager, profile.",
)
out = Console()
err = Console(stderr=True)


@app.callback(epilog="Exit codes: 0 success, 1 the export drifts from eager, 2 bad input or I/O, 130 interrupted.")
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of a failure (also TPC_DEBUG=1); anywhere on the line")
    ] = False,
) -> None:
    """`--debug` is read by `main` wherever it stands; declared here so that `tpc --help` lists it."""


EXIT_DRIFT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _quiet_libraries() -> None:
    """Nothing is ever downloaded, and library chatter would bury tpc's own report: Python warnings and library
    logs go to tpc's log file (`$TPC_CACHE_DIR/tpc.log`), progress bars are off. Imports nothing heavy."""
    global _QUIETED
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch resets its loggers' levels at import; this sticks
    if _QUIETED:
        return
    _QUIETED = True
    warnings.simplefilter("ignore")
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    try:
        handler: logging.Handler = logging.FileHandler(log_path(), delay=True)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    for noisy in ("torch.onnx", "onnxscript", "coremltools", "torchao", "torch.utils._pytree", "executorch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


_QUIETED = False


def log_path() -> Path:
    """Where library noise goes: the cache directory's `tpc.log` (created on first write)."""
    root = Path(os.environ.get("TPC_CACHE_DIR") or Path.home() / ".cache" / "tpc")
    root.mkdir(parents=True, exist_ok=True)
    return root / "tpc.log"


def native_output_to_log() -> None:
    """Send what C/C++ libraries write to file descriptors 1 and 2 (cpuinfo, ONNX Runtime, ExecuTorch) to the log,
    and keep Python's `sys.stdout`/`sys.stderr` (tpc's tables and lines, typer's help and usage errors) on the
    terminal. The real CLI only: in-process callers keep their streams."""
    try:
        log = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return
    for fd, name in ((1, "stdout"), (2, "stderr")):
        getattr(sys, name).flush()
        terminal = os.dup(fd)
        stream = open(terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        setattr(sys, name, stream)
        os.dup2(log, fd)
    os.close(log)


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


def check_json_path(path: Path | None, *exports: Path, flag: str = "--json") -> None:
    """`--json FILE` (or another report file, named by `flag`) must be writable, and not inside an export (it would
    change a hashed file), before any work."""
    if path is None:
        return
    target = Path(os.path.abspath(path))
    if target.is_dir():
        raise UsageError(f"{flag} '{path}' is a directory; pass a file name")
    for export_dir in exports:
        if Path(os.path.abspath(export_dir)) in target.parents:
            raise UsageError(f"{flag} '{path}' is inside the export '{export_dir}'; write the report outside it")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} '{path}': directory '{target.parent}' does not exist; create it first")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} '{path}' is not writable; choose another path")


def _render_verify(report: Any) -> None:
    atol = f"{report.atol} x max|eager|" if report.atol_scaled_by_max else f"{report.atol}"
    rule = f"pass: {report.rule}, atol {atol}, rtol {report.rtol}; margin = max |a-b| / (atol + rtol*|b|) <= 1"
    table = Table(title=f"verify: {report.runtime}, {report.samples} samples\n{rule}")
    for column in ("check", "max abs", "margin", "ok"):
        table.add_column(column, overflow="fold")
    passed = [check for check in report.shipped if check.passed]
    if passed:  # the ones that passed as one row (each is in --json); each failure on its own row
        label = "export's own files: sha256 as recorded, tpc.json I/O = artifacts, samples = eager"
        table.add_row(label, "", "", f"{len(passed)}/{len(report.shipped)} checks {_mark(True)}")
    for check in report.shipped:
        if not check.passed:
            detail = f" — {check.detail}" if check.detail else ""
            table.add_row(f"shipped: {check.check}{detail}", "", "", _mark(False))
    for name, (agreeing, rows) in report.kept.items():
        per = f"{report.samples} samples" + (f" x batch {rows // report.samples}" if rows != report.samples else "")
        table.add_row(f"{name} equal ({per})", "", "", f"{agreeing}/{rows} {_mark(agreeing == rows)}")
    for prefix, diffs in (("", report.outputs), ("teacher-forced ", report.teacher_forced)):
        for name, diff in _group_cache(diffs).items():
            table.add_row(f"{prefix}{name}", f"{diff.max_abs:.3g}", f"{diff.margin:.3g}", _mark(diff.passed))
    if report.generation is not None:
        g = report.generation
        label = f"greedy generation, {g.new_tokens} tokens x {g.samples} prompts"
        table.add_row(label, "", "", f"{g.rows_equal}/{g.rows} rows equal {_mark(g.rows_equal == g.rows)}")
        if g.seg_hidden is not None:
            d = g.seg_hidden
            label = f"generation: seg_hidden at {g.seg_tokens} [SEG] tokens"
            table.add_row(label, f"{d.max_abs:.3g}", f"{d.margin:.3g}", _mark(d.passed))
    if report.episode is not None:
        e = report.episode
        table.add_row(
            f"episodes, {e.episodes} x {e.steps} steps: kept tokens + actions", "", "", f"{e.steps_agreeing}/"
            f"{e.total_steps} steps equal {_mark(e.steps_agreeing == e.total_steps)}",
        )  # fmt: skip
        if e.history is not None:
            h = e.history
            table.add_row("episodes: carried history", f"{h.max_abs:.3g}", f"{h.margin:.3g}", _mark(h.passed))
    out.print(table)
    out.print(("[green]PASS[/green] " if report.passed else "[red]FAIL[/red] ") + report.diagnosis, soft_wrap=True)


def _render_export(directory: Path, json_path: Path | None) -> None:

    info = flow("inspect").describe_export(directory)
    _write_json(json_path, info)
    tokens = info["tokens"]
    out.print(
        f"[bold]{directory}[/bold]: {info['model']}, {info['method']} keep {info['keep']} -> {info['target']} "
        f"({info['dtype']}); visual tokens {tokens['before']} -> {tokens['after']}"
    )
    verification = info["verification"] or {}
    changed = info["changed_files"]
    if changed:  # the recorded result is about other files: never show it as this directory's
        listed = ", ".join(changed[:5]) + (f" (and {len(changed) - 5} more)" if len(changed) > 5 else "")
        recorded = (
            "was not run at export"
            if not verification
            else "was skipped at export"
            if verification.get("skipped")
            else "passed at export on the files then"
            if verification.get("passed")
            else "failed at export"
        )
        out.print(
            f"verification: [red]void[/red], {len(changed)} files changed since export ({listed}); it {recorded} "
            "(run `tpc verify`)",
            soft_wrap=True,
        )
    elif verification.get("skipped"):
        out.print(f"verification: skipped at export ({verification['skipped']})", soft_wrap=True)
    elif verification:
        out.print(f"verification: {'passed' if verification.get('passed') else 'FAILED'} at export")
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
            _render_neural_engine(graph["neural_engine"])


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


def _render_neural_engine(report: dict[str, Any]) -> None:
    """Core ML: the ops not expected on the Neural Engine, one row per op type (a static estimate)."""
    total = sum(int(row.get("count", 0)) for row in report.values())
    out.print(f"  off the Neural Engine (static estimate): {total} ops of {len(report)} types")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("op", "count", "why off the Neural Engine", "source"):
        table.add_column(column, no_wrap=column in ("op", "count"))
    for op, row in report.items():
        table.add_row(op, str(row.get("count", "")), str(row.get("reason", "")), str(row.get("source", "")))
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


class _TargetOptionsCommand(TyperCommand):
    """`tpc export` with the targets' options read from their `Options` dataclasses (`tpc.exporter.option_specs`):
    a flag for each option the CLI takes as a flag (`--compute-units`, its help and valid values), and the `--param
    NAME=VALUE` names in `--param`'s help. Built when the command parses or shows its help, not when `tpc` starts
    (`tpc --help` loads no target). Flag values land in `ctx.meta[TARGET_FLAGS]`; the target checks them."""

    _built = False

    def get_params(self, ctx: Any) -> list[Any]:
        if not self._built:
            self._built = True
            self._add_target_options()
        return super().get_params(ctx)

    def _add_target_options(self) -> None:

        flags: dict[str, list[tuple[str, Any]]] = {}
        params = []
        for target, specs in flow("targets").option_specs().items():
            for spec in specs:
                if spec.cli == "param":
                    choices = "|".join(spec.choices)
                    params.append(f"{target}: {spec.name}={choices} ({spec.help}; default {spec.default})")
                else:
                    flags.setdefault(spec.flag, []).append((target, spec))
        for param in self.params:
            if isinstance(param, TyperOption) and param.name == "param" and params:
                param.help = f"{param.help}; {'; '.join(params)}"
        self.params += _flag_params(flags)


TARGET_FLAGS = "tpc.target_flags"


def _flag_params(flags: dict[str, list[tuple[str, Any]]]) -> list[Any]:
    """typer options (through typer's public command builder) for the target options the CLI takes as flags: each
    keeps its value in `ctx.meta[TARGET_FLAGS]` under the option's name, not as an argument of the command."""

    def keeper(name: str) -> Any:
        def keep(ctx: typer.Context, value: str | None) -> None:
            if value is not None:
                ctx.meta.setdefault(TARGET_FLAGS, {})[name] = value

        return keep

    parameters = []
    for flag, uses in flags.items():
        spec = uses[0][1]
        shown = "; ".join(
            f"{target}: {s.help}"
            + (f": {' | '.join(s.choices)}" if s.choices and not all(c in s.help for c in s.choices) else "")
            + (f" (default {s.default})" if s.default else "")
            for target, s in uses
        )
        declared = typer.Option(
            None, flag, metavar=spec.metavar or "VALUE", help=shown, expose_value=False, callback=keeper(spec.name)
        )
        parameters.append(Parameter(spec.name, Parameter.KEYWORD_ONLY, default=declared, annotation=str | None))

    def holder(**_: Any) -> None:
        """Only its options are used."""

    holder.__signature__ = Signature(parameters)  # type: ignore[attr-defined]
    builder = typer.Typer(add_completion=False)
    builder.command()(holder)
    return list(typer.main.get_command(builder).params)


@app.command(cls=_TargetOptionsCommand)
def export(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="local Hugging Face model directory, or zoo:NAME")],
    method: Annotated[
        str, typer.Option(metavar="METHOD", help="pruning method (see `tpc methods`); none = unpruned baseline")
    ],
    output: Annotated[Path, typer.Option(metavar="DIR", help="export directory to create")],
    keep: Annotated[int | None, typer.Option(metavar="K", help="number of visual tokens to keep")] = None,
    target: Annotated[str, typer.Option(metavar="TARGET", help="onnx | tensorrt | executorch | coreml")] = "onnx",
    param: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=VALUE", help="method/model parameter, or target option (repeatable)"),
    ] = None,
    dtype: Annotated[str, typer.Option(metavar="DTYPE", help="fp32 | fp16")] = "fp32",
    prompt_len: Annotated[
        int | None,
        typer.Option(metavar="N", help="VLMs, policies: text tokens of the static prompt (default: the template's)"),
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(metavar="N", help="VLMs: tokens the static KV cache has room for (default 32)")
    ] = None,
    batch: Annotated[int, typer.Option(metavar="N", help="static batch size of the exported graph (1..64)")] = 1,
    samples: Annotated[int, typer.Option(metavar="N", help="inputs compared by the verification (1..64)")] = 4,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output directory")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the eager-vs-export check")] = False,
    bundle: Annotated[
        bool, typer.Option("--bundle", help="executorch: also write bundle/ for executor_runner and benchmark apps")
    ] = False,
) -> None:
    """Prune MODEL to KEEP visual tokens with METHOD, export it for TARGET, and verify it against eager."""

    params = _parse_params(param or [])
    options = {name: params.pop(name) for name in list(params) if name in flow("targets").PARAM_OPTIONS}
    options.update(ctx.meta.get(TARGET_FLAGS, {}))
    request = flow("build").PruneRequest(model, method, keep, params, dtype, batch, prompt_len, max_new_tokens)
    steps, verifies = rich_steps(err), not no_verify
    result = flow("export").export(request, target, output, force, verifies, samples, steps, options, bundle=bundle)
    if result.report is not None:
        _render_verify(result.report)
    if result.skipped is not None:
        out.print(f"[yellow]runtime check skipped[/yellow]: {result.skipped}", soft_wrap=True)
    manifest = result.manifest
    tokens = manifest.tokens
    parts = ", ".join(dict.fromkeys(c.artifact for c in manifest.components))
    pruning = (
        f"{tokens['before']} visual tokens, unpruned baseline"
        if manifest.method == "none"
        else f"{tokens['before']} -> {tokens['after']} visual tokens, pruned at the {tokens['stage']} stage"
    )
    out.print(f"wrote {result.directory} ({parts}: {pruning}, {target})")


@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="a directory written by `tpc export`")],
    samples: Annotated[
        int | None,
        typer.Option(metavar="N", help="seeded inputs, 1..64 (default 4; the first is the shipped sample)"),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help=".npz of your own inputs, keyed by input name (not with --samples)"),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="also write the report as JSON")
    ] = None,
    allow_skip: Annotated[
        bool,
        typer.Option("--allow-skip", help="exit 0 when the runtime cannot run here (Core ML off macOS), saying so"),
    ] = False,
) -> None:
    """Run the export in its runtime and compare with eager PyTorch; exit 1 if they differ."""

    check_json_path(json_path, directory)
    try:
        report = flow("verify").verify(directory, samples, inputs, step=rich_steps(err))
    except RuntimeUnavailable as unavailable:
        if not allow_skip:
            raise
        reason = getattr(unavailable, "reason", str(unavailable))
        reason = reason.split(", or pass --allow-skip")[0]  # it was passed: no advice to pass it
        ran = getattr(unavailable, "ran", [])
        out.print(f"[yellow]SKIPPED[/yellow] the runtime check: {reason}", soft_wrap=True)
        if ran:
            out.print(f"checks that ran here and passed ({len(ran)}):", soft_wrap=True)
            for check in ran:
                out.print(f"  {check}", soft_wrap=True)
        else:
            out.print("no check ran here")
        _write_json(json_path, {**flow("verify").skipped_verification(reason), "ran": ran})
        return
    _render_verify(report)
    _write_json(json_path, report.to_dict())
    if not report.passed:
        raise typer.Exit(EXIT_DRIFT)


@app.command()
def profile(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="a directory written by `tpc export`")],
    runs: Annotated[
        str, typer.Option(metavar="N|auto", help="timed rounds (1..100000), or 'auto': until --precision is reached")
    ] = "50",
    warmup: Annotated[int, typer.Option(metavar="N", help="untimed rounds first (0..10000)")] = 5,
    baseline: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="an export of the same model and inputs, timed interleaved with this one"),
    ] = None,
    precision: Annotated[
        float, typer.Option(metavar="REL", help="relative error asked for (--runs auto; the noise warnings)")
    ] = 0.05,
    confidence: Annotated[float, typer.Option(metavar="P", help="confidence of the speedup's interval")] = 0.95,
    max_seconds: Annotated[float, typer.Option(metavar="S", help="--runs auto: stop after this long")] = 300.0,
    rate: Annotated[
        float | None, typer.Option(metavar="HZ", help="a policy's control rate: deadline misses per graph")
    ] = None,
    tokens: Annotated[
        int | None, typer.Option(metavar="N", help="a VLM: tokens of the timed whole generation (default up to 16)")
    ] = None,
    cold: Annotated[bool, typer.Option(help="measure cold start and peak memory in a fresh process")] = True,
    operators: Annotated[bool, typer.Option(help="the runtime's per-operator profile, grouped by stage")] = True,
    cold_processes: Annotated[
        int, typer.Option(metavar="N", help="fresh processes for cold start and peak memory (their medians)")
    ] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="also write the report as JSON (docs/profile.md)")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(metavar="FILE.png", help="draw the latency distributions (needs matplotlib)")
    ] = None,
    etdump: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="executorch: read this ETDump recorded on a device instead of timing here"),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="--etdump: the method it recorded (default: the file stem, or the first)"),
    ] = None,
    tick_ns: Annotated[float, typer.Option(metavar="NS", help="--etdump: nanoseconds per ETDump tick")] = 1.0,
) -> None:
    """Latency of an export in its runtime: cold start, p50/p90/p99, per stage, and the speedup over a baseline."""

    check_json_path(json_path, directory)
    check_json_path(plot, directory, flag="--plot")
    profiling = flow("profile")
    if etdump is not None:
        report = profiling.etdump_profile(directory, etdump, method, tick_ns, precision)
        profiling.render(report, out)
        _write_json(json_path, report.to_dict())
        if plot is not None:
            profiling.plot(report, plot)
        return
    if runs.strip().lower() == "auto":
        count = None
    elif runs.strip().isdigit():
        count = int(runs)
    else:
        raise UsageError(f"--runs takes a number of rounds or 'auto', got '{runs}'")
    options = profiling.ProfileOptions(
        precision=precision,
        confidence=confidence,
        max_seconds=max_seconds,
        rate_hz=rate,
        tokens=tokens,
        cold=cold,
        operators=operators,
        cold_processes=cold_processes,
    )
    report = profiling.profile(directory, count, warmup, baseline, options, step=rich_steps(err))
    profiling.render(report, out)
    _write_json(json_path, report.to_dict())
    if plot is not None:
        profiling.plot(report, plot)


def _parse_keeps(keep: int | None, keeps: str | None) -> tuple[int, ...]:
    if (keep is None) == (keeps is None):
        raise UsageError("give the budget as --keep K or a sweep as --keeps K1,K2,... (one of the two)")
    if keep is not None:
        return (keep,)
    assert keeps is not None
    try:
        return tuple(int(part) for part in keeps.split(","))
    except ValueError:
        raise UsageError(f"--keeps takes comma-separated token counts like 98,49,24, got '{keeps}'") from None


@app.command(name="eval")
def evaluate(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="zoo:NAME or a model directory: a classifier or a VLM naming classes")
    ],
    dataset: Annotated[
        str, typer.Option(metavar="NAME|PATH", help="fashion-mnist, mnist-5k, a folder-per-class directory or an .npz")
    ],
    method: Annotated[str, typer.Option(metavar="METHOD", help="pruning method (see `tpc methods`)")],
    keep: Annotated[int | None, typer.Option(metavar="K", help="visual tokens to keep")] = None,
    keeps: Annotated[
        str | None, typer.Option(metavar="K1,K2,...", help="a sweep of budgets: one row each, and the curve")
    ] = None,
    target: Annotated[
        str | None, typer.Option(metavar="TARGET", help="also export each budget and measure it in its runtime")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(metavar="NAME=VALUE", help="method/model parameter (repeatable)")
    ] = None,
    split: Annotated[str, typer.Option(metavar="SPLIT", help="train or test")] = "test",
    batch_size: Annotated[
        int, typer.Option(metavar="N", help="images per call (1..64; the exported graphs' static batch)")
    ] = 32,
    seeds: Annotated[int, typer.Option(metavar="N", help="seeds of the random baseline (mean ± std)")] = 3,
    limit: Annotated[int | None, typer.Option(metavar="N", help="only the first N images of the split")] = None,
    resize: Annotated[
        bool, typer.Option(help="resize images to the model's size (bilinear) instead of refusing")
    ] = False,
    cache: Annotated[bool, typer.Option(help="reuse eager predictions cached per model and dataset")] = True,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="also write the report as JSON (docs/eval.md)")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(metavar="FILE.png", help="the retention curve (default with --keeps and --json: beside it)"),
    ] = None,
) -> None:
    """Accuracy under pruning on labelled images: unpruned, pruned eager, pruned exported, random and uniform."""

    budgets = _parse_keeps(keep, keeps)
    check_json_path(json_path)
    if plot is None and json_path is not None and len(budgets) > 1:
        plot = json_path.with_suffix(".png")
    check_json_path(plot, flag="--plot")
    evaluation = flow("evaluate")
    options = evaluation.EvalOptions(
        model=model,
        dataset=dataset,
        method=method,
        keeps=budgets,
        target=target,
        params=_parse_params(param or []),
        split=split,
        batch_size=batch_size,
        seeds=seeds,
        limit=limit,
        resize=resize,
        use_cache=cache,
    )
    report = evaluation.evaluate(options, console=err, step=rich_steps(err))
    evaluation.render(report, out)
    _write_json(json_path, report.to_json())
    if plot is not None:
        evaluation.plot(report, plot)
    if report.drifted:
        rows = ", ".join(str(row.keep) for row in report.drifted)
        _fail(f"the export answers differently from eager on more than 0.1 % of the images (keep {rows})", EXIT_DRIFT)
        raise typer.Exit(EXIT_DRIFT)


testbed = typer.Typer(no_args_is_help=True, help="The trained built-in models: how they are made.")
app.add_typer(testbed, name="testbed")


@testbed.command()
def train(
    name: Annotated[str, typer.Argument(metavar="NAME", help="fmnist-vit or fmnist-llava")],
    output: Annotated[Path, typer.Option(metavar="DIR", help="the new model directory (Hugging Face layout)")],
    encoder: Annotated[
        Path | None, typer.Option(metavar="DIR", help="fmnist-llava: the trained fmnist-vit (default: the shipped one)")
    ] = None,
    steps: Annotated[int | None, typer.Option(metavar="N", help="fewer steps than the recipe's (a smoke run)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Train a testbed recipe on Fashion-MNIST (seeded, one thread, ~10 minutes on 2 cores) into DIR."""

    flow("testbed").train_command(name, output, encoder, steps, force, err)


@app.command()
def inspect(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="zoo:NAME or a model directory (the plan), or an export directory"),
    ],
    method: Annotated[str, typer.Option(metavar="METHOD", help="pruning method")] = "hiprune",
    keep: Annotated[
        int | None, typer.Option(metavar="K", help="visual tokens to keep (default: a quarter of them)")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(metavar="NAME=VALUE", help="method/model parameter (repeatable)")
    ] = None,
    batch: Annotated[int, typer.Option(metavar="N", help="batch size (1..64)")] = 1,
    prompt_len: Annotated[
        int | None, typer.Option(metavar="N", help="VLMs, policies: text tokens of the static prompt")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="also write the plan as JSON")
    ] = None,
) -> None:
    """The plan: taps, prune point, tokens and FLOPs before/after (reads the config only); for an export
    directory, its components, shapes and the target's report (ExecuTorch delegation, Core ML ops)."""

    is_export = (Path(model) / MANIFEST_FILE).is_file()
    check_json_path(json_path, *([Path(model)] if is_export else []))
    if is_export:
        _render_export(Path(model), json_path)
        return

    request = flow("build").PruneRequest(model, method, keep, _parse_params(param or []), "fp32", batch, prompt_len)
    plan, lines = flow("inspect").describe_and_render(request)
    _write_json(json_path, plan)
    for line in lines:
        out.print(line)


@app.command()
def methods() -> None:
    """The methods, the model families each applies to, and their parameters (default, valid values)."""
    from rich.text import Text

    def shown(param: Any) -> str:  # alpha=0.1 in (0, 1]; seed=0 (>= 0); object_layer=auto (encoder layer)
        default = "auto" if param.default is None else param.default
        domain = f" in {param.domain}" if param.domain[0] in "([" else f" ({param.domain})"
        return f"{param.name}={default}{domain}"

    table = Table(title="methods (--param NAME=VALUE; auto: derived from the model)")
    for column in ("method", "stage", "families", "parameters", "what it keeps", "reference"):
        table.add_column(column, no_wrap=column in ("method", "stage"))
    for method in REGISTRY.values():
        families = ", ".join(name for name, kind in FAMILY_KINDS.items() if accepts_method(kind, method))
        params = "\n".join(shown(p) for p in method.params) or "-"
        cells = (method.name, method.stage, families, params, method.summary, method.reference)
        table.add_row(*(Text(cell) for cell in cells))
    out.print(table)


@app.command()
def zoo() -> None:
    """The built-in models: architecture-faithful, random-initialised, and two trained on Fashion-MNIST."""

    table = Table(title="zoo (use as zoo:NAME)")
    for column in ("name", "family", "tokens", "layers", "description"):
        table.add_column(column)
    for entry in ZOO.values():  # declared by each entry: listing makes no config (no transformers)
        table.add_row(entry.name, entry.family, f"{entry.patches} + {entry.prefix}", str(entry.layers), entry.summary)
    out.print(table)


def one_line(text: str) -> str:
    """A message as the single line the contract promises."""
    return " ".join(str(text).split()) or "(no message)"


def _fail(message: str, code: int) -> int:
    err.print(f"error: {one_line(message)}", markup=False, highlight=False, soft_wrap=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 success; 1 only when an export drifts from eager; 2 for every usage,
    input, file, environment or I/O problem (one `error: ...` line); 130 when interrupted. A traceback only with
    `TPC_DEBUG=1` or `--debug`."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("TPC_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    _quiet_libraries()
    try:
        code = app(args=args, prog_name="tpc", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        err.print("aborted", markup=False, highlight=False)
        return EXIT_INTERRUPTED
    except typer.Exit as done:
        code = done.exit_code
    except SystemExit as done:  # typer exits 1 on a broken pipe; 1 means drift, and this is an I/O problem
        return EXIT_USAGE if done.code == 1 else int(done.code or 0)
    except VerificationFailed as failure:
        _render_verify(failure.report)
        return _fail("the export does not match eager PyTorch; nothing was written (see the table above)", EXIT_DRIFT)
    except (UsageError, TyperException) as error:
        if isinstance(error, TyperException) and type(error).__name__ == "NoArgsIsHelpError":  # bare `tpc`: help
            out.print(error.format_message(), markup=False, highlight=False)
            return 0
        if debug:
            traceback.print_exc()
        if isinstance(error, TyperException):
            return _fail(f"{error.format_message()} (see `tpc --help` and `tpc COMMAND --help`)", EXIT_USAGE)
        return _fail(str(error), EXIT_USAGE)
    except Exception as error:  # the contract: exit 2 and one line, whatever failed underneath
        if debug:
            traceback.print_exc()
        return _fail(describe_failure(error), EXIT_USAGE)
    if code == EXIT_INTERRUPTED:  # typer returns 130 for a Ctrl-C (or SIGTERM) inside a command
        err.print("aborted", markup=False, highlight=False)
    return code if isinstance(code, int) else 0


def describe_failure(error: BaseException) -> str:
    """One line for a failure that is not a UsageError: what failed, and what to do."""
    if isinstance(error, MemoryError):
        return "out of memory; export a smaller --batch or model, or free memory (TPC_DEBUG=1 shows where)"
    if isinstance(error, OSError) and error.strerror:
        where = f" '{error.filename}'" if error.filename else ""
        return f"{error.strerror}{where}; check the path and its permissions (TPC_DEBUG=1 shows where)"
    detail = one_line(str(error))[:300]
    return (
        f"{type(error).__name__}: {detail} — the input may be malformed or unsupported; rerun with TPC_DEBUG=1 for "
        "the traceback and report it if the input is valid"
    )
