"""The fixed cost of one runtime call, whatever the graph computes: binding the inputs, allocating and writing the
outputs, the session's own dispatch.

No pruning removes it, so it bounds every speedup (the untouchable share, tpc.profiling.ideal). It is measured with
an empty graph of the component's I/O: the same inputs (names, static shapes, dtypes) and each output of its static
shape and dtype, filled by broadcasting the first element of the first input (so the runtime cannot fold it into a
constant and skip the writes). ONNX Runtime only: another runtime's empty program would need its own toolchain.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tpc.contract.manifest import ComponentSpec, TensorSpec
from tpc.runtimes.onnxruntime import OnnxRuntime

if TYPE_CHECKING:
    import onnx

OPSET, IR_VERSION = 17, 8  # ONNX 1.12's pair, which every supported ONNX Runtime loads
EMPTY_MODEL = "empty.onnx"


@dataclass(frozen=True)
class CallOverhead:
    ms: float | None  # median per call; None: not measured (`reason` says why)
    reason: str | None = None
    calls: int = 0


def empty_graph(spec: ComponentSpec) -> onnx.ModelProto:
    """A graph with `spec`'s inputs and outputs that computes nothing: each output is the first input's first
    element, cast to the output's dtype and expanded to its shape."""
    from onnx import TensorProto, helper

    def value(tensor: TensorSpec) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(
            tensor.name, helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), tensor.shape
        )

    first = spec.inputs[0].name
    nodes = [
        helper.make_node("Constant", [], ["flat_shape"], value=helper.make_tensor("", TensorProto.INT64, [1], [-1])),
        helper.make_node("Reshape", [first, "flat_shape"], ["flat"]),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("", TensorProto.INT64, [1], [1])),
        helper.make_node("Slice", ["flat", "zero", "one"], ["seed"]),
    ]
    for i, out in enumerate(spec.outputs):
        dtype = elem_type(out.dtype)
        shape = helper.make_tensor("", TensorProto.INT64, [len(out.shape)], out.shape)
        nodes += [
            helper.make_node("Cast", ["seed"], [f"seed_{i}"], to=dtype),
            helper.make_node("Constant", [], [f"shape_{i}"], value=shape),
            helper.make_node("Expand", [f"seed_{i}", f"shape_{i}"], [out.name]),
        ]
    graph = helper.make_graph(
        nodes, f"empty_{spec.name}", [value(t) for t in spec.inputs], [value(t) for t in spec.outputs]
    )
    # the IR version of the opset, not the onnx package's newest, which an older ONNX Runtime refuses to load
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def elem_type(dtype: str) -> int:
    """ONNX's element type of a tpc.json dtype (numpy has no bfloat16)."""
    from onnx import TensorProto, helper

    return TensorProto.BFLOAT16 if dtype == "bfloat16" else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def zero_inputs(spec: ComponentSpec) -> dict[str, np.ndarray]:
    return {t.name: np.zeros(t.shape, dtype=np.dtype(t.dtype)) for t in spec.inputs}


def call_overhead(spec: ComponentSpec, runtime: str, calls: int = 50, warmup: int = 5) -> CallOverhead:
    """The median time of one call of an empty graph of `spec`'s I/O in `runtime` (tpc.json `runtime`)."""
    if runtime != OnnxRuntime.name:
        return CallOverhead(None, f"the fixed overhead is measured in {OnnxRuntime.name} only, not {runtime}")
    if spec.stages:
        return CallOverhead(None, f"'{spec.name}' runs as several programs (its stages), not one graph")
    import onnx

    model = empty_graph(spec)
    onnx.checker.check_model(model, full_check=True)
    inputs = zero_inputs(spec)
    with tempfile.TemporaryDirectory(prefix="tpc-overhead-") as scratch:
        path = Path(scratch) / EMPTY_MODEL
        onnx.save(model, str(path))
        session = OnnxRuntime.load(path)
        for _ in range(warmup):
            session.run(inputs)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            session.run(inputs)
            times.append(time.perf_counter() - start)
    return CallOverhead(statistics.median(times) * 1e3, None, calls)
