"""How the select op's lowering splits an ExecuTorch program into XNNPACK islands (tpc.json's delegation facts).

For each tiny model and method, the components are lowered exactly as `tpc export --target executorch` lowers
them, and the delegation report counts islands (delegate calls), portable runs between them, and the runs that
hold a select op's TopK. `none` is the unpruned baseline: its islands come from the model alone. Then, on the
same graphs, the select op is lowered three ways:

    index_select: float64 key -> TopK -> ascending TopK -> reshape + flat index_select (ONNX's lowering)
    gather:       ... -> torch.gather with the indices expanded over D (tpc's ExecuTorch lowering)
    one_hot_bmm:          ... -> one-hot (K, N) matrix @ tokens, so that XNNPACK can run the gather as a bmm

XNNPACK has no TopK, so every lowering needs at least one portable run per select; the question is whether
the gather adds more. Writes results/executorch_islands.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine

from tpc.exporter.base import export_program
from tpc.exporter.executorch import lower
from tpc.ops.select import kept_indices, select_tokens_decomposition, select_tokens_gather_decomposition
from tpc.pipeline import PruneRequest, build

CASES = {
    "zoo:tiny-clip": ["none", "hiprune", "divprune", "random"],
    "zoo:tiny-siglip": ["none", "hiprune", "divprune", "random"],
    "zoo:tiny-llava": ["none", "hiprune", "fastv", "divprune", "random"],
}
OUT = Path(__file__).resolve().parent / "results" / "executorch_islands.json"


def by_one_hot_bmm(scores: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = kept_indices(scores, k)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    one_hot = (indices.unsqueeze(-1) == positions).to(tokens.dtype)
    return indices, torch.bmm(one_hot, tokens)


LOWERINGS = {
    "index_select": select_tokens_decomposition,  # ONNX's flat gather
    "gather": select_tokens_gather_decomposition,  # tpc's ExecuTorch lowering
    "one_hot_bmm": by_one_hot_bmm,
}


def programs(model: str, method: str, lowering: str) -> dict[str, torch.export.ExportedProgram]:
    pruned = build(PruneRequest(model, method, None if method == "none" else 16))
    samples = pruned.samples(0)
    table = {torch.ops.tpc.select_tokens.default: LOWERINGS[lowering]}
    out = {}
    for name, component in pruned.components.items():
        if name == "decode":
            continue  # no select, same graph for every method
        out[name] = export_program(component.module, samples[name]).run_decompositions(table)
    return out


def main() -> int:
    console = Console()
    rows = []
    for model, methods in CASES.items():
        for method in methods:
            for lowering in LOWERINGS if method != "none" else ["index_select"]:
                start = time.perf_counter()
                _, reports = lower(programs(model, method, lowering))
                seconds = time.perf_counter() - start
                for component, report in reports.items():
                    rows.append({
                        "model": model, "method": method, "lowering": lowering, "component": component,
                        "islands": report["islands"], "portable_runs": report["portable_segments"],
                        "select_runs": report["select_segments"],
                        "delegated_flops_share": report["delegated_flops_share"], "lower_seconds": seconds,
                    })  # fmt: skip
                    console.print(rows[-1])
    baseline = {(r["model"], r["component"]): r["islands"] for r in rows if r["method"] == "none"}
    for row in rows:
        row["islands_over_unpruned"] = row["islands"] - baseline[(row["model"], row["component"])]
    OUT.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    table = Table(title="XNNPACK islands per component (select lowerings side by side)")
    for column in ("model", "method", "component", *LOWERINGS):
        table.add_column(column)
    for model, methods in CASES.items():
        for method in methods:
            for component in {r["component"] for r in rows if r["model"] == model and r["method"] == method}:
                cells = []
                for lowering in LOWERINGS:
                    found = [r for r in rows if (r["model"], r["method"], r["component"], r["lowering"])
                             == (model, method, component, lowering)]  # fmt: skip
                    cells.append(f"{found[0]['islands']} ({found[0]['select_runs']} sel)" if found else "-")
                table.add_row(model, method, component, *cells)
    console.print(table)
    console.print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
