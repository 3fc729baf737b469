"""Target options are typed dataclasses the CLI builds its flags from, and graph rewrites follow one pass protocol
whose failures name the pass (without exporting a model: these are the declarations and the protocol)."""

from __future__ import annotations

import contextlib
import io

import pytest

from tpc.cli import main
from tpc.errors import UsageError
from tpc.exporter import TARGET_NAMES, TARGETS, get_target, option_specs, target_options
from tpc.exporter.base import ExportPart
from tpc.exporter.graph_pass import CheckPass, GraphContractError, GraphPass, PassFailed, run_passes
from tpc.exporter.onnx import StaticShapeError
from tpc.exporter.tensorrt import TensorRTLegalityError, TensorRTOptions, TensorRTTarget


def test_light_option_declarations_are_the_targets_own() -> None:
    for name in TARGET_NAMES:
        assert target_options(name) is TARGETS[name].Options, name


def test_options_parse_strings_into_the_dataclass_with_one_line_errors() -> None:
    assert get_target("tensorrt").options == TensorRTOptions("native")
    assert get_target("tensorrt", trt_select="plugin").options.trt_select == "plugin"
    assert TensorRTTarget("plugin").options == TensorRTTarget(TensorRTOptions("plugin")).options
    with pytest.raises(UsageError, match=r"^--param trt_select=fused: expected one of native, plugin$"):
        get_target("tensorrt", trt_select="fused")
    with pytest.raises(UsageError, match=r"^option 'trt_select' does not apply to target 'onnx' \(its options: none\)"):
        get_target("onnx", trt_select="plugin")
    with pytest.raises(TypeError):
        TensorRTTarget("native", "plugin")
    (spec,) = option_specs()["tensorrt"]
    assert (spec.name, spec.default, spec.choices, spec.cli) == ("trt_select", "native", ("native", "plugin"), "param")


def test_export_help_shows_each_target_option_with_its_values() -> None:
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        assert main(["export", "--help"]) == 0
    text = " ".join(shown.getvalue().split())
    assert "tensorrt: trt_select=native|plugin" in text
    assert "--compute-units UNITS" in text and "cpu_and_ne" in text


class _Double(GraphPass[int]):
    name = "double"

    def call(self, program: int) -> int:
        return 2 * program


class _Positive(CheckPass[int]):
    name = "positive"

    def check(self, program: int) -> None:
        if program <= 0:
            raise StaticShapeError(f"{program} is not positive")


class _Broken(GraphPass[int]):
    name = "broken"

    def requires(self, program: int) -> None:
        raise KeyError("no such node")


def test_run_passes_runs_in_order_and_names_the_failing_pass() -> None:
    assert run_passes([_Double(), _Positive(), _Double()], 3, "demo") == 12
    with pytest.raises(StaticShapeError, match=r"target demo: graph pass 'positive' failed \(ensures\): -2 is not"):
        run_passes([_Double(), _Positive()], -1, "demo")
    with pytest.raises(PassFailed, match=r"graph pass 'broken' failed \(requires\): 'no such node'"):
        run_passes([_Broken()], 1, "demo")
    assert issubclass(TensorRTLegalityError, GraphContractError) and issubclass(PassFailed, UsageError)


def test_each_target_lists_its_passes_in_order(tmp_path) -> None:
    part = ExportPart(None, {}, ())  # type: ignore[arg-type]
    names = {
        "onnx": [p.name for p in TARGETS["onnx"]().passes(part, tmp_path / "m.onnx")],
        "tensorrt": [p.name for p in TensorRTTarget("native").passes(part, tmp_path / "m.onnx")],
        "tensorrt plugin": [p.name for p in TensorRTTarget("plugin").passes(part, tmp_path / "m.onnx")],
        "executorch": [p.name for p in TARGETS["executorch"]().passes()],
    }
    assert names == {
        "onnx": ["lower_tpc_ops", "to_onnx", "static_shapes"],
        "tensorrt": ["lower_tpc_ops", "to_onnx", "tensorrt_legality"],
        "tensorrt plugin": ["to_onnx", "insert_plugin_nodes", "tensorrt_legality"],
        "executorch": ["lower_tpc_ops", "xnnpack_partition"],
    }
