"""`tpc profile`: the statistics behind its figures, its report schema, and what it says about real exports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpc.cli import main
from tpc.profiling import ProfileOptions, overhead_warning, precise_enough, profile
from tpc.profiling.report import SCHEMA, validate
from tpc.profiling.stats import Summary, noise_check, paired_ratios, percentile, samples_behind

latencies = st.lists(st.floats(0.01, 1e4, allow_nan=False), min_size=1, max_size=300)


@given(latencies)
@settings(max_examples=60, deadline=None)
def test_summary_is_ordered_and_made_of_observed_samples(samples: list[float]) -> None:
    s = Summary.of(samples)
    assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p99_ms <= s.max_ms
    assert {s.p50_ms, s.p90_ms, s.p99_ms} <= set(samples)  # nearest rank: never an interpolation
    assert s.runs == len(samples) and 1 <= s.tail_samples <= len(samples)
    assert sum(x >= s.p99_ms for x in samples) >= s.tail_samples


def test_samples_behind_a_percentile() -> None:
    assert samples_behind(99, 50) == 1 and samples_behind(99, 1000) == 11 and samples_behind(50, 10) == 6
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile(list(range(1, 101)), 99) == 99


@given(st.lists(st.floats(0.5, 50, allow_nan=False), min_size=4, max_size=200), st.floats(1.1, 5))
@settings(max_examples=40, deadline=None)
def test_paired_ratio_of_a_scaled_copy_is_the_scale(samples: list[float], scale: float) -> None:
    ratios = paired_ratios(samples, [x * scale for x in samples])
    for ratio in ratios:
        assert ratio.ratio == pytest.approx(scale) and ratio.low == pytest.approx(scale)
        assert ratio.measurable
    same = paired_ratios(samples, samples)
    assert all(r.ratio == 1.0 and not r.measurable for r in same)


def test_paired_ratio_cancels_drift_shared_by_a_round() -> None:
    """The machine slows down 3x during the run; both exports see it round by round. Resampling rounds keeps the
    pairs, so the interval of a true 1.2x stays tight and excludes 1."""
    rng = np.random.default_rng(0)
    drift = np.linspace(1, 3, 200)
    export = 10 * drift * rng.uniform(0.98, 1.02, 200)
    baseline = 12 * drift * rng.uniform(0.98, 1.02, 200)
    p50 = paired_ratios(export.tolist(), baseline.tolist())[0]
    assert p50.measurable and 1.1 < p50.low <= p50.ratio <= p50.high < 1.3


def test_noise_check_flags_drift_and_spread_against_the_precision() -> None:
    steady = noise_check([10.0, 10.1, 9.9, 10.0] * 10, 0.05, "x")
    assert steady.warnings == () and steady.cv < 0.01
    stepped = noise_check([10.0] * 20 + [13.0] * 20, 0.05, "x")
    assert stepped.drift == pytest.approx(0.3 / 1.15, rel=0.3) and "moved +" in stepped.warnings[0]
    spread = noise_check([1.0, 10.0] * 20, 0.05, "x")
    assert any("coefficient of variation" in w for w in spread.warnings)


def test_schema_is_a_valid_json_schema_and_rejects_a_report_without_its_samples() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        validate({"format": "tpc-profile/1"})


@pytest.fixture(scope="module")
def clip_pair(exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An export and a byte-identical copy of it: whatever the profiler says about them is noise."""
    export = exported("zoo:tiny-clip", "uniform", 8)
    copy = tmp_path_factory.mktemp("twin") / "twin"
    shutil.copytree(export, copy)
    return export, copy


def test_identical_exports_are_no_measurable_difference(clip_pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    export, twin = clip_pair
    report_file, plot_file = tmp_path / "r.json", tmp_path / "p.png"
    args = ["profile", str(export), "--baseline", str(twin), "--runs", "60", "--confidence", "0.99"]
    assert main([*args, "--json", str(report_file), "--plot", str(plot_file)]) == 0
    out = capsys.readouterr().out
    assert "no measurable difference" in out
    report = json.loads(report_file.read_text())
    validate(report)
    assert report["comparison"]["measurable"] is False and len(report["export"]["samples_ms"]) == 60
    assert report["settings"]["order"].startswith("interleaved")
    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cold = report["export"]["cold"]
    assert cold["load_ms"] > 0 and cold["first_run_ms"] > 0 and cold["peak_rss_mib"] > 0
    assert report["export"]["artifact_bytes"] == (export / "model.onnx").stat().st_size


def test_a_pruned_encoder_against_its_unpruned_baseline(exported: Callable[..., Path], tmp_path: Path) -> None:
    pruned, baseline = exported("zoo:tiny-clip", "hiprune", 40), exported("zoo:tiny-clip", "none", None)
    report = profile(pruned, 8, 1, baseline, ProfileOptions(cold=False))
    validate(json.loads(json.dumps(report.to_dict())))
    assert report.baseline is not None and report.comparison is not None
    ratio = report.comparison.ratios[0]
    assert ratio.ratio == pytest.approx(report.baseline.timing.p50_ms / report.export.timing.p50_ms)
    assert report.export.export["method"] == "hiprune" and report.baseline.export["method"] == "none"
    assert report.export.cold is None and "--no-cold" in (report.export.cold_unavailable or "")


def test_runs_auto_stops_when_the_interval_is_narrow_enough() -> None:
    rng = np.random.default_rng(1)
    steady = (10 * rng.uniform(0.99, 1.01, 20)).tolist()
    noisy = (10 * rng.uniform(0.2, 5.0, 20)).tolist()
    options = ProfileOptions(precision=0.05)
    assert precise_enough(steady, None, options) and not precise_enough(noisy, None, options)
    assert precise_enough(steady, [2 * x for x in steady], options)
    assert not precise_enough(steady, noisy, options)


def test_runs_auto_stops_at_the_time_cap(clip_pair: tuple[Path, Path]) -> None:
    export, _ = clip_pair
    tight = profile(export, None, 0, None, ProfileOptions(precision=1e-6, max_seconds=0.5, cold=False))
    assert tight.settings.auto and tight.settings.stopped_by == "time cap" and tight.settings.runs % 20 == 0


def test_a_vlm_reports_first_token_decode_and_a_whole_generation(exported: Callable[..., Path]) -> None:
    directory = exported("zoo:tiny-llava", "hiprune", 64)
    report = profile(directory, 4, 1, None, ProfileOptions(tokens=4, cold=False))
    side = report.export
    assert side.headline.startswith("time to first token") and set(side.components) == {"vision", "prefill", "decode"}
    ttft = np.add(side.component_samples_ms["vision"], side.component_samples_ms["prefill"])
    assert np.allclose(side.samples_ms, ttft)  # the headline is vision + prefill of the same round
    assert side.generation is not None and side.generation_tokens == 4 and side.generation.runs == 4
    # a whole generation is one prefill and 3 decode steps at least
    assert side.generation.p50_ms > side.components["decode"].min_ms * 3


def test_bad_profile_options_are_one_line(clip_pair: tuple[Path, Path], capsys) -> None:
    export, _ = clip_pair
    for args, fragment in (
        (["--runs", "many"], "--runs takes a number of rounds or 'auto'"),
        (["--runs", "0"], "--runs must be 'auto' or in 1..100000"),
        (["--precision", "2"], "--precision is a relative error"),
        (["--confidence", "1"], "--confidence must be in [0.5, 1)"),
        (["--rate", "-5"], "--rate is a control rate"),
        (["--plot", str(export / "p.png")], "--plot"),
        (["--tokens", "3"], "is not a VLM export"),
        (["--rate", "10"], "is not a policy export"),
    ):
        assert main(["profile", str(export), *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_fixed_overhead_that_dominates_is_said(clip_pair: tuple[Path, Path]) -> None:
    export, _ = clip_pair
    side = profile(export, 5, 1, None, ProfileOptions(cold=False, operators=False)).export
    assert set(side.overhead_ms) == {"model"} and 0 < side.overhead_ms["model"] < side.timing.p50_ms
    assert overhead_warning(side) == []  # the real graph: its compute dominates
    tiny = replace(side, overhead_ms={"model": 0.5 * side.timing.p50_ms})
    (warning,) = overhead_warning(tiny)
    assert "50% of its p50" in warning and "no pruning removes" in warning
