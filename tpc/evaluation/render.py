"""`tpc eval`'s report as a rich table, and the retention curve as a PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tpc.evaluation.report import MAX_DISAGREEMENT, EvalReport

SHOWN_DISAGREEMENTS = 5


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def render(report: EvalReport, console: Console) -> None:
    data = report.dataset
    console.print(
        f"{report.model} on {data.name} ({data.split}, {data.images} images, {len(data.classes)} classes): "
        f"unpruned {_percent(report.unpruned.accuracy)} top-1; the method keeps K of {report.tokens} visual tokens"
    )
    title = f"{report.method}: top-1 accuracy (retention = accuracy / unpruned)"
    table = Table(title=title)
    columns = ["keep", report.method, "retention", f"random (mean ± std, {len(report.keeps[0].random.seeds)} seeds)"]
    columns += ["uniform"] + ([f"{report.target}", "agrees with eager"] if report.target else [])
    for column in columns:
        table.add_column(column, justify="right")
    for row in report.keeps:
        random = row.random
        cells = [
            f"{row.keep} ({_percent(row.share)})"
            + (f"\nbaselines {row.baseline_keep} per image" if row.baseline_keep != row.keep else ""),
            _percent(row.eager.accuracy),
            f"{row.eager.retention:.3f}" if row.eager.retention is not None else "-",
            f"{_percent(random.mean)} ± {100 * random.std:.2f}",
            _percent(row.uniform.accuracy),
        ]
        if row.exported is not None:
            agreement = row.exported.agreement
            mark = "" if row.exported.within_tolerance else " [red](drift)[/red]"
            cells += [_percent(row.exported.accuracy.accuracy), f"{_percent(agreement)}{mark}"]
        table.add_row(*cells)
    console.print(table)
    for row in report.keeps:
        if row.exported is None or not row.exported.disagreements:
            continue
        listed = row.exported.disagreements
        ties = sum(d.near_tie for d in listed)
        console.print(
            f"keep {row.keep}: {len(listed)} image(s) answered differently by the export ({ties} near-ties), "
            f"tolerance {MAX_DISAGREEMENT * data.images:.0f}:"
        )
        for d in listed[:SHOWN_DISAGREEMENTS]:
            console.print(
                f"  image {d.index}: label {d.label}, eager {d.eager} (margin {d.eager_margin:.3g}), "
                f"exported {d.exported} (margin {d.exported_margin:.3g}){' near-tie' if d.near_tie else ''}"
            )
    console.print(f"[dim]{report.seconds:.0f} s; {report.cached_runs} eager runs from the cache[/dim]")


def plot(report: EvalReport, path: Path) -> None:
    """Accuracy against kept tokens: the method eager (and exported), random's mean ± std, uniform, unpruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report.keeps, key=lambda row: row.keep)
    keeps = [row.keep for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    axes.axhline(100 * report.unpruned.accuracy, color="black", linestyle="--", linewidth=1, label="unpruned")
    axes.plot(keeps, [100 * r.eager.accuracy for r in rows], "o-", color="tab:blue", label=f"{report.method} (eager)")
    if report.target is not None:
        exported = [100 * r.exported.accuracy.accuracy for r in rows if r.exported is not None]
        axes.plot(keeps, exported, "x", color="tab:red", markersize=9, label=f"{report.method} ({report.target})")
    mean = [100 * r.random.mean for r in rows]
    std = [100 * r.random.std for r in rows]
    axes.plot(keeps, mean, "s-", color="tab:gray", label="random (mean ± std)")
    low, high = [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)]
    axes.fill_between(keeps, low, high, color="tab:gray", alpha=0.25)
    axes.plot(keeps, [100 * r.uniform.accuracy for r in rows], "^-", color="tab:green", label="uniform")
    axes.set_xscale("log", base=2)
    axes.set_xticks(keeps, [str(k) for k in keeps])
    axes.set_xlabel(f"visual tokens kept (of {report.tokens})")
    axes.set_ylabel("top-1 accuracy (%)")
    data = report.dataset
    axes.set_title(f"{report.model}, {data.name} {data.split} ({data.images} images)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
