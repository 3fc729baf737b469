"""The delegation report: which nodes of a lowered ExecuTorch program run in the backend, and why not the rest.

A phone team reading a `.pte` needs three numbers before timing anything: how many delegate *islands* the
graph was cut into (each boundary costs a hand-over between XNNPACK and the portable kernels), what share
of the FLOPs the backend runs, and which op kinds stayed on portable kernels and why. The "why" comes
from the partitioner itself: XNNPACK's configs log a `WhyNoPartition` for every node they reject
(wrong dtype, unsupported arguments); an op kind with no XNNPACK config at all is reported as such.

FLOPs are counted per node from its output shape: 2·M·N·K for matrix products and convolutions (the work
that matters), one per output element for everything else.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

# matrix product -> (argument holding the right-hand matrix, its axis that is contracted)
MATMUL_INNER = {
    "aten.mm.default": (1, 0),  # (M, K) @ (K, N)
    "aten.addmm.default": (2, 0),  # bias + (M, K) @ (K, N)
    "aten.bmm.default": (1, 1),  # (B, M, K) @ (B, K, N)
    "aten.linear.default": (1, 1),  # x @ W.T, W (N, K)
}
CONV_OPS = frozenset({"aten.convolution.default"})
TOPK = "aten.topk.default"
NOT_COMPUTE = frozenset({"getitem", "executorch_call_delegate"})
NO_CONFIG = "no XNNPACK kernel"  # the op kind is not in the XNNPACK partitioner's list
PARTITIONER_LOGGERS = ("executorch.backends.xnnpack.partition.config.xnnpack_config",)


def op_kind(node: fx.Node) -> str:
    """`aten.topk.default` for an edge-dialect or ATen op node; the function's name otherwise."""
    target = getattr(node.target, "_op", node.target)  # an edge op wraps its ATen overload
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(node.target, "__name__", str(node.target))


def _input_value(node: fx.Node, index: int) -> torch.Tensor:
    """The traced value (`meta["val"]`) of a node's `index`-th argument, itself a node of the graph."""
    arg = node.args[index]
    assert isinstance(arg, fx.Node)  # a matrix product's or convolution's operands are graph values
    return arg.meta["val"]


def node_flops(node: fx.Node) -> int:
    out = node.meta.get("val")
    if isinstance(out, (tuple, list)):
        out = out[0] if out and isinstance(out[0], torch.Tensor) else None
    if not isinstance(out, torch.Tensor):
        return 0
    kind = op_kind(node)
    if kind in MATMUL_INNER:
        argument, axis = MATMUL_INNER[kind]
        return 2 * out.numel() * int(_input_value(node, argument).shape[axis])
    if kind in CONV_OPS:
        weight = _input_value(node, 1)
        return 2 * out.numel() * math.prod(weight.shape[1:])
    return out.numel()


def tensor_dtypes(node: fx.Node) -> set[str]:
    """dtypes of a node's tensor inputs and output, e.g. {'int64', 'bool'}: why XNNPACK refused it."""
    values = [arg.meta.get("val") for arg in node.all_input_nodes] + [node.meta.get("val")]
    return {str(v.dtype).removeprefix("torch.") for v in values if isinstance(v, torch.Tensor)}


@dataclass
class OpDelegation:
    delegated: int = 0
    portable: int = 0
    why: list[str] = field(default_factory=list)  # the partitioner's reasons for the portable ones


@dataclass
class DelegationReport:
    backend: str
    islands: int  # delegate calls: each is one contiguous subgraph handed to the backend
    portable_segments: int  # runs of portable nodes between islands, in execution order
    select_segments: int  # of those, the ones holding a TopK (tpc's select op): one per select is the minimum
    delegated_nodes: int
    portable_nodes: int
    delegated_flops: int
    portable_flops: int
    ops: dict[str, OpDelegation]

    @property
    def flops_share(self) -> float:
        total = self.delegated_flops + self.portable_flops
        return self.delegated_flops / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delegated_flops_share"] = round(self.flops_share, 6)
        return data


class ReasonLog(logging.Handler):
    """Collects the partitioner's `WhyNoPartition` messages by node name while lowering runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        why = record.msg
        node, reason = getattr(why, "node", None), getattr(why, "reason", None)
        if node is not None and reason:
            self.reasons.setdefault(node.name, str(reason))


@contextlib.contextmanager
def capture_reasons() -> Iterator[ReasonLog]:
    handler = ReasonLog()
    loggers = [logging.getLogger(name) for name in PARTITIONER_LOGGERS]
    saved = [(log.level, log.propagate) for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False
    try:
        yield handler
    finally:
        for log, (level, propagate) in zip(loggers, saved, strict=True):
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate


def delegation_report(graph_module: fx.GraphModule, reasons: dict[str, str], backend: str) -> DelegationReport:
    """Walk a lowered edge program: top-level compute nodes are portable, nodes inside delegates are not."""
    ops: dict[str, OpDelegation] = defaultdict(OpDelegation)
    flops: Counter[str] = Counter()
    islands = 0
    segments: list[set[str]] = [set()]  # op kinds of each portable run, split at every delegate call
    for node in graph_module.graph.nodes:
        lowered = getattr(graph_module, str(node.target), None) if node.op == "get_attr" else None
        if lowered is not None and hasattr(
            lowered, "original_module"
        ):  # a delegate: the subgraph handed to the backend
            islands += 1
            segments.append(set())
            for sub in lowered.original_module.graph_module.graph.nodes:
                if sub.op == "call_function" and (kind := op_kind(sub)) not in NOT_COMPUTE:
                    ops[kind].delegated += 1
                    flops["delegated"] += node_flops(sub)
        elif node.op == "call_function" and (kind := op_kind(node)) not in NOT_COMPUTE:
            ops[kind].portable += 1
            segments[-1].add(kind)
            flops["portable"] += node_flops(node)
            why = reasons.get(node.name, NO_CONFIG)
            if why == "invalid dtype":
                why = f"dtype {'/'.join(sorted(tensor_dtypes(node)))} unsupported"
            if why not in ops[kind].why:
                ops[kind].why.append(why)
    return DelegationReport(
        backend=backend,
        islands=islands,
        portable_segments=sum(1 for kinds in segments if kinds),
        select_segments=sum(1 for kinds in segments if TOPK in kinds),
        delegated_nodes=sum(o.delegated for o in ops.values()),
        portable_nodes=sum(o.portable for o in ops.values()),
        delegated_flops=flops["delegated"],
        portable_flops=flops["portable"],
        ops=dict(sorted(ops.items())),
    )
