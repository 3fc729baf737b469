"""ONNX Runtime (CPU): run an exported `model.onnx`, optionally teacher-forced.

Teacher forcing answers "did the selection flip, or does the computation differ?": the node that computes
the forced tensor (e.g. `kept_indices`) is cut out and the tensor becomes a graph input, so the exported
computation downstream of the selection runs on the indices we feed it (the eager ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime


def _producer_tensor(graph: object, name: str) -> str:
    """The tensor actually consumed downstream: follow Identity nodes back from a graph output."""
    producers = {out: node for node in graph.node for out in node.output}
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name


def force_tensors(model: object, outputs: tuple[str, ...]) -> tuple[object, dict[str, str]]:
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

    def __init__(self, session: object, feeds: dict[str, str]) -> None:
        self.session = session
        self.feeds = feeds  # forced output name -> graph input name
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> OnnxRuntime:
        """An ONNX file has one graph, with its own I/O names: `entry` is not needed."""
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not forced:
            return cls(ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"]), {})
        model, feeds = force_tensors(onnx.load(str(artifact)), forced)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return cls(session, feeds)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {self.feeds.get(name, name): value for name, value in inputs.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))

    @classmethod
    def versions(cls) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}
