"""A runtime's per-operator profile, and the static facts of the graph nodes it is about.

Runtimes time nodes; tpc reports stages (`tpc.contract.names.STAGES`). Between the two sits where each node came
from, which the exporter recorded and the runtime does not report: torch.onnx's dynamo exporter writes, on every
node, the module path it ran in (`pkg.torch.onnx.name_scopes`), those modules' classes
(`pkg.torch.onnx.class_hierarchy`) and the Python stack that made it (`pkg.torch.onnx.stack_trace`). `GraphNode`
holds them with the node's tensors (for the data flow that tells a tap from the attention it sits in), and
`OperatorEvent` a node's measured time; `tpc.profiling.stages` turns both into a per-stage breakdown.

Standard library only: a plain record of what a runtime measured, importable wherever the runtimes are.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass

# torch.onnx's metadata keys (the dynamo exporter, torch >= 2.6)
NAME_SCOPES, CLASS_HIERARCHY, STACK_TRACE = (
    "pkg.torch.onnx.name_scopes",
    "pkg.torch.onnx.class_hierarchy",
    "pkg.torch.onnx.stack_trace",
)

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)\n[ \t]*(?P<code>[^\n]*)')


@dataclass(frozen=True)
class SourceLine:
    """One frame of the Python stack that made a node (outermost first in `GraphNode.source`)."""

    file: str
    line: int
    function: str
    code: str


@dataclass(frozen=True)
class GraphNode:
    """A node of an exported graph as the exporter recorded it.

    `scopes`: the module paths it ran in, outermost first, without the root module (`tower`,
    `tower.model.encoder.layers.3`, `tower.model.encoder.layers.3.self_attn`); `classes`: their module classes
    (fully qualified); both empty when the exporter recorded none (a node a later graph pass made)."""

    name: str
    op_type: str
    scopes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    source: tuple[SourceLine, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def scope(self) -> str:
        """The innermost module path ("" for an operation of the exported module's own forward)."""
        return self.scopes[-1] if self.scopes else ""


@dataclass(frozen=True)
class OperatorEvent:
    """One node's time in a runtime profile, summed over the timed runs (warm-up runs excluded).

    `node`: the name the runtime gave the kernel it ran (a fused node: the runtime's name for the fusion);
    `origin`: the exported graph's node it maps to (the fusion's first node), whose `scope` it carries; None when
    nothing in the exported graph matches. `calls`: kernel executions counted (runs x executions per run)."""

    node: str
    op_type: str
    origin: str | None
    scope: str
    total_ms: float
    calls: int


def parse_stack(trace: str) -> tuple[SourceLine, ...]:
    """The frames of a recorded Python stack trace ("File ..., line N, in f\\n    code"), outermost first."""
    return tuple(
        SourceLine(match["file"], int(match["line"]), match["function"], match["code"].strip())
        for match in _FRAME.finditer(trace)
    )


def _literal_list(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # an exporter that wrote something else: no scope rather than a crash
        return ()
    return tuple(str(item) for item in value) if isinstance(value, (list, tuple)) else ()


def graph_node(
    name: str, op_type: str, metadata: Mapping[str, str], inputs: tuple[str, ...], outputs: tuple[str, ...]
) -> GraphNode:
    """A node from its recorded metadata. The exporter's lists end with the node's own operation (`conv2d`,
    `aten.conv2d.default`) and start with the root module (""): both are dropped, leaving the modules."""
    scopes, classes = _literal_list(metadata.get(NAME_SCOPES)), _literal_list(metadata.get(CLASS_HIERARCHY))
    if len(scopes) != len(classes):  # not the exporter's aligned pair: keep the paths, drop the classes
        classes = ("",) * len(scopes)
    return GraphNode(
        name,
        op_type,
        scopes[1:-1],
        classes[1:-1],
        parse_stack(metadata.get(STACK_TRACE, "")),
        inputs,
        outputs,
    )


def origin_of(node: str, known: Mapping[str, object] | frozenset[str] | set[str]) -> str | None:
    """The exported node a runtime's node name stands for: itself, or the node a fusion was named after.

    ONNX Runtime names a fused node after the first node it absorbed, with the fusion appended
    (`node_MatMul_159/MatMulScaleFusion//MatmulTransposeFusion/`, `node_Reshape_903_new_reshape`): cut at the
    first `/`, then drop `_suffix`es until a name of the exported graph matches."""
    candidate = node.split("/", 1)[0]
    while candidate:
        if candidate in known:
            return candidate
        if "_" not in candidate:
            return None
        candidate = candidate.rsplit("_", 1)[0]
    return None
