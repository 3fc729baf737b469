"""TensorRT target, everything short of an engine (TensorRT cannot be installed here): the TensorRT-legal ONNX and
its checker, both select lowerings, the plugin node's round trip, build_engine.sh, and the one-line skip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_select_op import _Select, score_arrays  # tie-heavy scores with NaN, ±inf, ±0

from tpc.cli import main
from tpc.exporter.onnx import StaticShapeError
from tpc.exporter.tensorrt import (
    MAX_TOPK_K,
    PLUGIN_NAME,
    TensorRTLegalityError,
    TensorRTTarget,
    check_tensorrt_graph,
)
from tpc.ops.reference import token_select_reference
from tpc.ops.select import select_tokens_float32_decomposition
from tpc.runtimes.onnxruntime import OnnxRuntime


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_float32_lowering_keeps_the_rule_without_float64(data: st.DataObject) -> None:
    tokens = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, tokens))
    scores = data.draw(score_arrays(data.draw(st.integers(1, 3)), tokens))
    features = np.random.default_rng(0).normal(size=(*scores.shape, 3)).astype(np.float32)
    indices, kept = select_tokens_float32_decomposition(torch.from_numpy(scores), torch.from_numpy(features), k)
    want_indices, want_kept = token_select_reference(scores, features, k)
    np.testing.assert_array_equal(indices.numpy(), want_indices)
    np.testing.assert_array_equal(kept.numpy(), want_kept)


@pytest.fixture(scope="module")
def native_select(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxRuntime, dict]:
    path = tmp_path_factory.mktemp("trt") / "select.onnx"
    inputs = {"scores": torch.randn(2, 24), "tokens": torch.randn(2, 24, 3)}
    facts = TensorRTTarget("native").export(_Select(7), inputs, ("kept_indices", "kept_tokens"), path)
    return OnnxRuntime.load(path), facts


@settings(max_examples=150, deadline=None)
@given(scores=score_arrays(2, 24))
def test_native_graph_runs_the_rule_in_onnxruntime(native_select: tuple[OnnxRuntime, dict], scores) -> None:
    session, facts = native_select
    assert facts["op_counts"]["TopK"] == 2 and "TokenSelect" not in facts["op_counts"]
    tokens = np.arange(2 * 24 * 3, dtype=np.float32).reshape(2, 24, 3)
    got = session.run({"scores": scores, "tokens": tokens})
    want_indices, want_kept = token_select_reference(scores, tokens, 7)
    np.testing.assert_array_equal(got["kept_indices"], want_indices)
    np.testing.assert_array_equal(got["kept_tokens"], want_kept)


def _graph(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _value(name: str, dtype: int, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _topk(k: int, n: int, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="the_topk", axis=-1)
    return _graph(
        [node],
        [_value("x", dtype, [1, n])],
        [_value("values", dtype, [1, k]), _value("indices", TensorProto.INT64, [1, k])],
        [helper.make_tensor("k", TensorProto.INT64, [1], [k])],
    )


def test_checker_accepts_a_legal_topk_and_rejects_each_broken_rule() -> None:
    check_tensorrt_graph(_topk(64, 576))
    with pytest.raises(TensorRTLegalityError, match=rf"TopK node 'the_topk' has K={MAX_TOPK_K + 1}.*K <= 3840"):
        check_tensorrt_graph(_topk(MAX_TOPK_K + 1, 5000))
    with pytest.raises(TensorRTLegalityError, match="TopK node 'the_topk' takes INT64 input"):
        check_tensorrt_graph(_topk(4, 16, TensorProto.INT64))
    double = helper.make_node("Cast", ["x"], ["y"], name="to_double", to=TensorProto.DOUBLE)
    model = _graph([double], [_value("x", TensorProto.FLOAT, [2])], [_value("y", TensorProto.DOUBLE, [2])])
    with pytest.raises(TensorRTLegalityError, match=r"node 'to_double' .*float64 tensor 'y'"):
        check_tensorrt_graph(model)
    shift = helper.make_node("BitShift", ["a", "b"], ["c"], name="shifty", direction="LEFT")
    ints = [_value(n, TensorProto.UINT32, [4]) for n in ("a", "b")]
    model = _graph([shift], ints, [_value("c", TensorProto.UINT32, [4])])
    with pytest.raises(TensorRTLegalityError, match=r"node 'shifty' is ai\.onnx::BitShift"):
        check_tensorrt_graph(model)
    relu = helper.make_node("Relu", ["x"], ["y"], name="dynamic")
    model = _graph([relu], [_value("x", TensorProto.FLOAT, ["n"])], [_value("y", TensorProto.FLOAT, ["n"])])
    with pytest.raises(StaticShapeError, match="non-static shape"):
        check_tensorrt_graph(model)


@pytest.fixture(scope="module")
def llava_trt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt") / "llava"
    args = ["--method", "hiprune", "--keep", "64", "--target", "tensorrt", "--samples", "1"]
    assert main(["export", "zoo:tiny-llava", "--output", str(out), *args]) == 0
    return out


def test_tiny_llava_export_is_tensorrt_legal_with_a_build_script(llava_trt: Path, capsys) -> None:
    manifest = json.loads((llava_trt / "tpc.json").read_text())
    assert manifest["target"] == "tensorrt"
    assert "engine step was skipped" in manifest["verification"]["skipped"]
    for component in manifest["components"]:
        model = onnx.load(str(llava_trt / component["artifact"]))
        check_tensorrt_graph(model)  # re-checked on the written file
        graph = component["graph"]
        assert graph["tensorrt_legal"] and graph["trt_select"] == "native"
        check = graph["onnxruntime_check"]
        assert check["exact_outputs_equal"] and check["max_abs_diff"] < 1e-4
    vision = manifest["components"][0]["graph"]
    assert vision["op_counts"]["TopK"] >= 2 and "TokenSelect" not in vision["op_counts"]
    script = (llava_trt / "build_engine.sh").read_text()
    for name in ("vision", "prefill", "decode"):
        assert f"trtexec --onnx={name}.onnx --saveEngine={name}.engine" in script
        assert f"--saveEngine={name}.fp16.engine --fp16" in script
    assert "--dynamicPlugins" not in script
    plugin = {p.name for p in (llava_trt / "plugin").iterdir()}
    assert {"token_select.cu", "CMakeLists.txt"} <= plugin
    assert main(["verify", str(llava_trt)]) == 2
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and "TensorRT is not installed here" in last and err.count("error:") == 1
    assert main(["verify", str(llava_trt), "--allow-skip"]) == 0


def test_plugin_lowering_is_one_tokenselect_node_that_round_trips(tmp_path: Path, capsys) -> None:
    import onnx_graphsurgeon as gs

    out = tmp_path / "clip"
    args = ["--method", "divprune", "--keep", "16", "--target", "tensorrt", "--param", "trt_select=plugin"]
    assert main(["export", "zoo:tiny-clip", "--output", str(out), *args]) == 0
    assert "engine step was skipped" in capsys.readouterr().out
    manifest = json.loads((out / "tpc.json").read_text())
    assert "trt_select" not in manifest["params"] and manifest["components"][0]["graph"]["trt_select"] == "plugin"
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (node,) = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"k": 16, "plugin_namespace": b"tpc", "plugin_version": b"1"}
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    assert [(c.op_type, c.attribute[0].i) for c in consumers] == [("Cast", TensorProto.INT64)]
    assert "kept_indices" in {o.name for o in model.graph.output}
    again = gs.export_onnx(gs.import_onnx(model))  # graphsurgeon reads and writes it unchanged
    assert [(n.op_type, list(n.input), list(n.output)) for n in again.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in model.graph.node
    ]
    script = (out / "build_engine.sh").read_text()
    assert (
        "cmake -S plugin -B plugin/build" in script and "--dynamicPlugins=plugin/build/libtpc_trt_plugin.so" in script
    )
