"""ONNX Runtime (CPU): run an exported `model.onnx`, optionally teacher-forced.

Teacher forcing answers "did the selection flip, or does the computation differ?": the node that computes
the forced tensor (e.g. `kept_indices`) is cut out and the tensor becomes a graph input, so the exported
computation downstream of the selection runs on the indices we feed it (the eager ones).

`operator_profile` times every node with ONNX Runtime's own profiler, and `graph_nodes` reads where each node came
from out of the file (see `tpc.runtimes.operators`), for `tpc profile`'s per-stage breakdown.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tpc.errors import UsageError
from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime, TensorIO, artifact_path, invalid_artifact
from tpc.runtimes.operators import GraphNode, OperatorEvent, graph_node, origin_of

if TYPE_CHECKING:
    import onnx
    import onnxruntime

ONNX_MODEL = "ONNX model"
CPU = ("CPUExecutionProvider",)


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
        feeds: dict[str, str] = {}
        model: str | bytes = str(path)
        if forced:
            forced_model, feeds = force_tensors(read_onnx(path), forced)
            model = forced_model.SerializeToString()
        return cls(open_session(path, model, ort.SessionOptions()), feeds)

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


def open_session(
    path: Path, model: str | bytes, options: onnxruntime.SessionOptions, providers: Sequence[str] = CPU
) -> onnxruntime.InferenceSession:
    """A session on `model` (the file at `path`, or a changed copy's bytes), quiet; an artifact ONNX Runtime
    refuses is one UsageError line naming `path`."""
    import onnxruntime as ort

    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=list(providers))
    except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise invalid_artifact(path, ONNX_MODEL, err) from None


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


def graph_nodes(artifact: str | Path) -> list[GraphNode]:
    """The nodes of an ONNX file's main graph, in graph (topological) order, with the module scopes and stack the
    exporter recorded on each; the weights are not read."""
    import onnx

    path = artifact_path(artifact, ONNX_MODEL)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, ...
        raise invalid_artifact(path, ONNX_MODEL, err) from None
    return [
        graph_node(
            node.name,
            node.op_type,
            {prop.key: prop.value for prop in node.metadata_props},
            tuple(node.input),
            tuple(node.output),
        )
        for node in model.graph.node
    ]


KERNEL_SUFFIX = "_kernel_time"  # ONNX Runtime's name for a node's kernel event: "<node>_kernel_time"


def operator_profile(
    artifact: str | Path,
    inputs: dict[str, np.ndarray],
    runs: int,
    warmup: int,
    nodes: Sequence[GraphNode] | None = None,
    providers: Sequence[str] = CPU,
) -> list[OperatorEvent]:
    """Per-node kernel times of `runs` calls of an ONNX file, after `warmup` untimed ones: one event per node that
    ran, its time summed over the timed runs (`calls` = runs x executions per run), slowest first.

    The session is a fresh one with ONNX Runtime's profiler on, so the graph is optimised exactly as
    `OnnxRuntime.load` optimises it (its fused nodes are the ones timed; `origin` maps each back to the exported
    node whose scope it carries). The profiler's trace (chrome-trace JSON) goes to a temporary directory, deleted
    before returning; warm-up runs are told apart by the trace's per-run `model_run` spans, so the first
    allocations and the thread pool's spin-up are not counted. `nodes`: the file's `graph_nodes`, if the caller
    read them already."""
    import onnxruntime as ort

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise UsageError(f"an operator profile needs at least one timed run, got runs={runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"warm-up runs must be a whole number >= 0, got warmup={warmup!r}")
    path = artifact_path(artifact, ONNX_MODEL)
    by_name = {node.name: node for node in (graph_nodes(path) if nodes is None else nodes)}
    with tempfile.TemporaryDirectory(prefix="tpc-ort-profile-") as scratch:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = open_session(path, str(path), options, providers)
        wanted = [i.name for i in session.get_inputs()]
        missing, unknown = sorted(set(wanted) - set(inputs)), sorted(set(inputs) - set(wanted))
        if missing or unknown:
            raise UsageError(
                f"'{path.name}' takes inputs {', '.join(wanted)}; "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"not inputs of it: {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
            )
        try:
            for _ in range(warmup + runs):
                session.run(None, inputs)
        except Exception as err:  # wrong shapes or dtypes: onnxruntime's own exception types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"'{path.name}' did not run on the given inputs: {first}") from None
        trace = json.loads(Path(session.end_profiling()).read_text())
    return kernel_events(trace, warmup, by_name)


def kernel_events(trace: list[dict[str, Any]], warmup: int, nodes: dict[str, GraphNode]) -> list[OperatorEvent]:
    """Sum the trace's kernel events per node, keeping those inside the timed runs' `model_run` spans."""
    spans = sorted(
        (event["ts"], event["ts"] + event["dur"])
        for event in trace
        if event.get("cat") == "Session" and event.get("name") == "model_run"
    )[warmup:]
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    op_types: dict[str, str] = {}
    order: list[tuple[float, str]] = []  # the first timed run's kernels, in execution order
    for event in trace:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        run = next((index for index, (start, stop) in enumerate(spans) if start <= event["ts"] <= stop), None)
        if run is None:
            continue
        node = name[: -len(KERNEL_SUFFIX)]
        totals[node] += event["dur"] / 1000.0  # the trace counts microseconds
        calls[node] += 1
        op_types[node] = event.get("args", {}).get("op_name", "")
        if run == 0:
            order.append((event["ts"], node))
    origins = _origins([node for _, node in sorted(order)], nodes)
    events = []
    for node, total in totals.items():
        origin = origins.get(node)
        scope = nodes[origin].scope if origin is not None else ""
        events.append(OperatorEvent(node, op_types[node], origin, scope, total, calls[node]))
    events.sort(key=lambda event: event.total_ms, reverse=True)
    return events


def _origins(executed: list[str], nodes: dict[str, GraphNode]) -> dict[str, str | None]:
    """Each executed node's exported node: by name (`origin_of`), else the nearest named kernel it ran beside.

    The optimiser also makes nodes with names of its own (`gemm_input_reshape_token_8` before a Gemm,
    `ReorderOutput` after an NCHWc Conv, `SkipLayerNormalization` fusing a residual Add into the next norm): one
    whose name says it finishes something (`output`, `reorder`) takes the named kernel before it, any other the
    one after it (each side the fallback of the other)."""
    named = [origin_of(node, nodes) for node in executed]
    origins: dict[str, str | None] = {}
    for index, node in enumerate(executed):
        if named[index] is not None:
            origins[node] = named[index]
            continue
        before = next((o for o in reversed(named[:index]) if o is not None), None)
        after = next((o for o in named[index + 1 :] if o is not None), None)
        finishes = any(word in node.lower() for word in ("output", "reorder"))
        origins[node] = (before or after) if finishes else (after or before)
    return origins
