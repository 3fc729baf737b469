"""ONNX Runtime (CPU): run an exported `model.onnx`, optionally teacher-forced.

Teacher forcing answers "did the selection flip, or does the computation differ?": the node that computes
the forced tensor (e.g. `kept_indices`) is cut out and the tensor becomes a graph input, so the exported
computation downstream of the selection runs on the indices we feed it (the eager ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc.errors import UsageError
from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime, TensorIO, artifact_path, invalid_artifact

if TYPE_CHECKING:
    import onnx
    import onnxruntime

ONNX_MODEL = "ONNX model"


def _producer_tensor(graph: onnx.GraphProto, name: str) -> str:
    """The tensor actually consumed downstream: follow Identity nodes back from a graph output."""
    producers = {out: node for node in graph.node for out in node.output}
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name


def read_onnx(artifact: str | Path) -> onnx.ModelProto:
    """The ModelProto of an ONNX file (external data loaded); a missing, empty or unparsable file, or one without
    a graph, is one UsageError line."""
    import onnx

    path = artifact_path(artifact, ONNX_MODEL)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError, a missing external-data file, ...
        raise invalid_artifact(path, ONNX_MODEL, err) from None
    if not model.graph.node or not model.graph.output:
        raise UsageError(f"'{path}' is not a valid {ONNX_MODEL} (it has no graph); re-export it")
    return model


def force_tensors(model: onnx.ModelProto, outputs: tuple[str, ...]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Copy of `model` in which each named output is a graph input; returns it and {output: input name}."""
    import onnx

    forced = onnx.ModelProto()
    forced.CopyFrom(model)
    graph = forced.graph
    out_types = {value.name: value.type for value in graph.output}
    feeds = {}
    for name in outputs:
        tensor = _producer_tensor(graph, name)
        producer = next((node for node in graph.node if tensor in node.output), None)
        if producer is None:  # a constant (e.g. the unpruned baseline's indices): the input replaces it
            graph.initializer.remove(next(init for init in graph.initializer if init.name == tensor))
        elif len(producer.output) > 1:  # keep the node's other outputs alive under fresh names
            producer.output[list(producer.output).index(tensor)] = f"{tensor}__unforced"
        else:
            graph.node.remove(producer)
        graph.input.append(onnx.helper.make_value_info(tensor, out_types[name]))
        feeds[name] = tensor
    return forced, feeds


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    requires = ("onnxruntime",)
    extra = "onnx"

    def __init__(self, session: onnxruntime.InferenceSession, feeds: dict[str, str]) -> None:
        self.session = session
        self.feeds = feeds  # forced output name -> graph input name
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> OnnxRuntime:
        """An ONNX file has one graph, with its own I/O names: `entry` is not needed. A missing, empty, truncated
        or otherwise unloadable file is one UsageError line."""
        import onnxruntime as ort

        path = artifact_path(artifact, ONNX_MODEL)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        feeds: dict[str, str] = {}
        model: str | bytes = str(path)
        if forced:
            forced_model, feeds = force_tensors(read_onnx(path), forced)
            model = forced_model.SerializeToString()
        try:
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise invalid_artifact(path, ONNX_MODEL, err) from None
        return cls(session, feeds)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {self.feeds.get(name, name): value for name, value in inputs.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))

    @classmethod
    def versions(cls) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    @classmethod
    def artifact_io(
        cls, path: Path, method: str | None, want_inputs: TensorIO, want_outputs: TensorIO
    ) -> tuple[TensorIO, TensorIO]:
        """The graph's declared inputs (less those with an initializer) and outputs: names, shapes, dtypes."""
        return onnx_io(path)


def onnx_io(path: Path) -> tuple[TensorIO, TensorIO]:
    """An ONNX file's declared I/O (also the TensorRT runtime's artifact, which is ONNX)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def described(values: Any, skip: set[str]) -> TensorIO:
        io = {}
        for value in values:
            if value.name in skip:  # an input with an initializer is a constant (older ONNX IR), not an input
                continue
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            io[value.name] = (shape, str(np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type))))
        return io

    return described(model.graph.input, initializers), described(model.graph.output, set())
