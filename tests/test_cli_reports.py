"""`tpc methods`, `zoo`, `inspect`, `profile`: the reports users read before and after an export."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tpc.cli import main
from tpc.profiling.report import validate


def test_methods_and_zoo_list_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ("hiprune", "divprune", "random", "uniform", "fastv", "none"):
        assert name in listing
    assert "llm-prefill" in listing
    assert main(["zoo"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-clip" in listing and "tiny-siglip" in listing and "576 + 1" in listing


def test_inspect_reports_taps_prune_point_tokens_and_flops(tmp_path: Path, capsys) -> None:
    plan_file = tmp_path / "plan.json"
    assert main(["inspect", "zoo:clip-vit-l-336", "--method", "hiprune", "--keep", "64", "--json", str(plan_file)]) == 0
    text = capsys.readouterr().out
    assert "tap layer 9" in text and "tap layer 23" in text and "576 -> 64" in text
    plan = json.loads(plan_file.read_text())
    assert [t["layer"] for t in plan["taps"]] == [9, 23]
    assert plan["params"] == {"feature_layer": 23, "alpha": 0.1, "object_layer": 9, "deep_layer": 23}
    assert plan["layers_run"] == 23 and plan["tokens"] == {"before": 576, "after": 64}
    assert plan["flops"]["pruned_graph"] * 24 == plan["flops"]["encoder_full"] * 23
    assert sum(stage["flops"] for stage in plan["stage_costs"]) == plan["flops"]["pruned_graph"]  # the same model
    assert all(t["block_bytes"] <= plan["output_attentions_bytes"] / 24 for t in plan["taps"])  # one map at most


def test_profile_side_by_side_with_baseline(exported: Callable[..., Path], tmp_path: Path, capsys) -> None:
    pruned = exported("zoo:tiny-clip", "hiprune", 40)
    baseline = exported("zoo:tiny-clip", "none", None)
    report_file = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                str(pruned),
                "--runs",
                "5",
                "--warmup",
                "1",
                "--baseline",
                str(baseline),
                "--json",
                str(report_file),
            ]
        )
        == 0
    )
    assert "speedup per percentile" in capsys.readouterr().out
    report = json.loads(report_file.read_text())
    validate(report)
    assert report["export"]["timing"]["runs"] == 5 and report["baseline"]["timing"]["runs"] == 5
    p50 = report["comparison"]["ratios"][0]
    assert p50["ratio"] == pytest.approx(report["baseline"]["timing"]["p50_ms"] / report["export"]["timing"]["p50_ms"])
