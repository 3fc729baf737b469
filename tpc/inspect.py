"""`tpc inspect`: the plan of a pruned export, computed from the config alone (no weights are loaded).

Shows what will be tapped and what it costs next to asking for `output_attentions`, where the prune point is, and
tokens and FLOPs before and after, so a user can check a budget before spending an export on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tpc.contract.cost import StageCost, costs_to_dicts
from tpc.contract.manifest import Manifest, changed_files
from tpc.kinds.base import check_common
from tpc.models_zoo import resolve
from tpc.pipeline import PruneRequest, kind_for


def describe(request: PruneRequest) -> dict[str, Any]:
    """The plan as plain data (the CLI renders it; `--json` writes it). Without a keep, plans a quarter of the
    visual tokens, so a user can see the plan before choosing a budget."""
    return describe_and_render(request)[0]


def describe_and_render(request: PruneRequest) -> tuple[dict[str, Any], list[str]]:
    """`describe`, and the lines `tpc inspect` prints for it (rich markup), worded by the model's kind."""
    check_common(request)
    source = resolve(request.model)
    kind = kind_for(source)
    plan = kind.describe(request, source)
    costs = kind.stage_costs(kind.plan(request, source))
    plan["stage_costs"] = costs_to_dicts(costs)
    return plan, [*kind.render(plan), *cost_lines(costs)]


def cost_lines(costs: list[StageCost]) -> list[str]:
    """The cost model per graph and stage, one line per graph: what `tpc profile` divides measured times by."""
    lines = ["cost per call (GFLOPs / MB moved), by graph and stage (recorded in tpc.json as `cost`):"]
    for component in dict.fromkeys(c.component for c in costs):
        stages = ", ".join(
            f"{c.stage} {c.flops / 1e9:.3f} / {c.bytes / 1e6:.1f}" for c in costs if c.component == component
        )
        lines.append(f"  {component}: {stages}")
    return lines


def describe_export(directory: Path) -> dict[str, Any]:
    """An export directory as plain data: what it holds, its static I/O, and each component's target report
    (the ExecuTorch delegation table, Core ML's MIL ops and Neural Engine notes, ONNX op counts).
    `changed_files`: files that no longer match the sha256 recorded at export (or are gone, or were added
    since), for which `verification` is void."""
    manifest = Manifest.read(directory)
    changed, missing, added = changed_files(directory, manifest)
    return {
        "directory": str(directory),
        "model": manifest.model["ref"],
        "method": manifest.method,
        "keep": manifest.keep,
        "target": manifest.target,
        "dtype": manifest.dtype,
        "tokens": manifest.tokens,
        "verification": manifest.verification,  # as recorded at export
        "changed_files": changed + missing + added,  # since export: the recorded verification no longer applies to them
        "components": [
            {
                "name": spec.name,
                "artifact": spec.artifact,
                "method": spec.method,
                "inputs": {s.name: f"{s.dtype}{s.shape}" for s in spec.inputs},
                "outputs": {s.name: f"{s.dtype}{s.shape}" for s in spec.outputs},
                "graph": spec.graph,
            }
            for spec in manifest.methods  # a staged policy step as its prefill and decode methods
        ],
    }
