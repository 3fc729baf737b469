"""`tpc profile --plot FILE.png`: the latency distributions, because a median hides the tail a deadline cares about.

Left: the headline's samples of the export (and the baseline), as empirical distributions with p50/p99 marked.
Right: where the time goes, per graph (and per stage when the runtime gave a per-operator profile).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpc.errors import require
from tpc.profiling.report import ExportProfile, ProfileReport


def _sides(report: ProfileReport) -> list[tuple[str, ExportProfile]]:
    sides = [("export", report.export)]
    if report.baseline is not None:
        sides.append(("baseline", report.baseline))
    return sides


def plot(report: ProfileReport, path: Path) -> None:
    require("--plot", ("matplotlib",), "bench")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for (label, side), colour in zip(_sides(report), ("tab:blue", "tab:grey"), strict=False):
        ordered = np.sort(side.samples_ms)
        share = np.arange(1, ordered.size + 1) / ordered.size
        name = f"{label}: {side.export['method']} keep {side.export['keep']}"
        left.step(ordered, share, where="post", color=colour, label=name)
        for q, style in ((side.timing.p50_ms, "--"), (side.timing.p99_ms, ":")):
            left.axvline(q, color=colour, linestyle=style, linewidth=1)
    left.set_xlabel(f"{report.export.headline} (ms)")
    left.set_ylabel("share of runs at or below")
    title = "latency distribution (dashed p50, dotted p99)"
    if report.comparison is not None:
        title += f"\n{report.comparison.verdict}"
    left.set_title(title, fontsize=9)
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)

    bars: dict[str, dict[str, float]] = {}  # segment -> side label -> ms
    labels = []
    for label, side in _sides(report):
        labels.append(label)
        if side.operators:
            for component, breakdown in side.operators.items():
                for stage in breakdown.stages:
                    bars.setdefault(f"{component}: {stage.stage}", {})[label] = stage.ms
        else:
            for component, summary in side.components.items():
                bars.setdefault(component, {})[label] = summary.p50_ms
    bottom = np.zeros(len(labels))
    colours = plt.get_cmap("tab20")
    for index, (segment, per_side) in enumerate(bars.items()):
        heights = np.array([per_side.get(label, 0.0) for label in labels])
        right.bar(labels, heights, bottom=bottom, label=segment, color=colours(index % 20))
        bottom += heights
    basis = "per stage, mean ms per call (operator profile)" if report.export.operators else "per graph, p50 ms"
    right.set_title(f"where the time goes: {basis}", fontsize=9)
    right.set_ylabel("ms")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    machine = report.machine
    cores = f" ({machine.cores} cores)" if machine.cores else ""
    figure.suptitle(f"tpc profile: {report.export.runtime}, {machine.cpu}{cores}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
