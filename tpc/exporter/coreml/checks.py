"""Checks and facts of a converted MIL program: static shapes, op counts, select chains, Neural Engine estimate.

`check_static_program` fails the export if any MIL value has a symbolic dimension or any op's output size could
depend on data (tpc graphs are static: no `RangeDim`/`EnumeratedShapes`). The rest are facts for the manifest.

Neural Engine. `neural_engine_report` lists the program's ops that are not expected to run on the ANE, with the
reason and where that is stated (`ANE_OP_RULES`, `ANE_DTYPE_RULES`). Apple publishes no per-op list: placement
depends on the device generation, OS version and tensor shapes (Apple's reply in apple/coremltools#1780), so this
is a static, conservative estimate; on a Mac, `MLComputePlan` reports the real per-op device (the macOS device
tests print it).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tpc.exporter.onnx import StaticShapeError
from tpc.runtimes.coreml import ARRAY_DTYPES

GATHER_OPS = frozenset({"gather", "gather_along_axis", "gather_nd"})
# MIL ops whose output size depends on data, or whose control flow does: never in a static tpc graph.
DATA_DEPENDENT_OPS = frozenset({"non_zero", "while_loop", "cond", "make_list", "list_read", "list_write"})


@dataclass(frozen=True)
class AneRule:
    reason: str
    source: str


# Sources of the Neural Engine table. Apple documents the precision rule and says no per-op list exists; the rest
# is public measurement, and where nothing public says an op runs on the ANE it is assumed not to.
SRC_TYPED_EXECUTION = (
    "coremltools docs, Typed Execution (apple.github.io/coremltools/docs-guides/source/typed-execution.html, "
    "typed-execution-example.html): a float 32 typed ML program executes on GPU and CPU; float 16 is eligible for NE"
)
SRC_GATHER = (
    "hollance/neural-engine docs/unsupported-layers.md (measured: gather does not run on the ANE); "
    "apple/coremltools#1103 (gather along axis as slow with ALL as with CPU_ONLY). coremltools 9 narrows gather and "
    "topk indices to int16 (pass add_int16_cast), which newer ANEs may accept: confirm with MLComputePlan"
)
SRC_INTEGER = (
    "hollance/neural-engine docs/16-bit.md (measured: the ANE computes in float16); apple/coremltools#2365 "
    "(int32 tensors force ops onto the CPU; only 16-bit types can stay on the ANE)"
)
SRC_UNSTATED = (
    "no public statement that the ANE implements it, so assumed CPU/GPU; Apple publishes no per-op list "
    "(placement depends on device, OS and shapes: apple/coremltools#1780): confirm with MLComputePlan on a Mac"
)

# Op type -> why it is not expected on the Neural Engine.
ANE_OP_RULES: dict[str, AneRule] = {
    **{
        op: AneRule("gather/scatter with computed indices", SRC_GATHER)
        for op in ("gather", "gather_along_axis", "gather_nd", "scatter", "scatter_along_axis", "scatter_nd")
    },
    **{op: AneRule("sort/selection", SRC_UNSTATED) for op in ("topk", "argsort")},
    **{op: AneRule("index reduction (int32 result)", SRC_INTEGER) for op in ("reduce_argmax", "reduce_argmin")},
    "range_1d": AneRule("integer range", SRC_INTEGER),
    "one_hot": AneRule("one-hot of integer indices", SRC_INTEGER),
    "band_part": AneRule("mask construction", SRC_UNSTATED),
}
# Dtype conditions, checked in this order when no op rule applies.
ANE_DTYPE_RULES: dict[str, AneRule] = {
    "int32": AneRule("int32 tensors", SRC_INTEGER),
    "bool": AneRule("bool tensors", SRC_UNSTATED),
    "fp32": AneRule("fp32 compute", SRC_TYPED_EXECUTION),
}


def operations(block: Any) -> Iterator[Any]:
    """Every op of a block and of the blocks nested in its ops; MIL program objects and their protobuf spec
    have the same shape (`operations`, `blocks`), so this walks both."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from operations(inner)


def dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def check_static_program(program: Any) -> None:
    """Raise StaticShapeError naming the value or op if any shape in the MIL program could depend on data."""
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    for function_name, function in program.functions.items():
        for name, var in function.inputs.items():
            if any_symbolic(var.shape):
                raise StaticShapeError(
                    f"Core ML input '{name}' of '{function_name}' has a non-static shape {var.shape}"
                )
        for op in operations(function):
            if op.op_type in DATA_DEPENDENT_OPS:
                raise StaticShapeError(f"MIL op '{op.name}' is {op.op_type}, whose output depends on data")
            for var in op.outputs:
                if types.is_tensor(var.sym_type) and any_symbolic(var.shape):
                    raise StaticShapeError(f"MIL value '{var.name}' ({op.op_type}) has a non-static shape {var.shape}")


def mil_op_counts(program: Any) -> dict[str, int]:
    """Op type -> count over the main function, `const` (weights and literals) left out."""
    counts = Counter(op.op_type for op in operations(program.functions["main"]) if op.op_type != "const")
    return dict(sorted(counts.items()))


def select_chains(program: Any, max_depth: int = 12) -> list[str]:
    """Each shortest data path from a `topk` to the `indices` of a `gather*`, as 'topk(name) -> ... -> gather(name)'.

    The proof that the selection survived conversion as Core ML's own top-k feeding a gather; sub-paths of a
    longer path (the ascending topk alone) are folded into it.
    """
    ops = list(operations(program.functions["main"]))
    consumers: dict[int, list[tuple[Any, str]]] = {}
    for op in ops:
        for input_name, bound in op.inputs.items():
            for var in bound if isinstance(bound, (list, tuple)) else [bound]:
                consumers.setdefault(id(var), []).append((op, input_name))
    chains: list[list[Any]] = []
    for start in (op for op in ops if op.op_type == "topk"):
        queue: deque[list[Any]] = deque([[start]])
        seen = {id(start)}
        while queue:
            path = queue.popleft()
            if len(path) > max_depth:
                continue
            for var in path[-1].outputs:
                for consumer, input_name in consumers.get(id(var), []):
                    if consumer.op_type in GATHER_OPS and input_name == "indices":
                        chains.append([*path, consumer])
                    elif id(consumer) not in seen:
                        seen.add(id(consumer))
                        queue.append([*path, consumer])
    keys = [tuple(id(op) for op in chain) for chain in chains]
    longest = [
        chain
        for chain, key in zip(chains, keys, strict=True)
        if not any(other != key and other[-len(key) :] == key for other in keys)
    ]
    return sorted(" -> ".join(f"{op.op_type}({op.name})" for op in chain) for chain in longest)


def _ane_rule(op: Any) -> AneRule | None:
    """The first rule that applies to `op`: its type, then the dtypes it reads (non-constant) or writes."""
    if op.op_type in ANE_OP_RULES:
        return ANE_OP_RULES[op.op_type]
    computed = [v for v in op.inputs.values() if not isinstance(v, (list, tuple)) and v.val is None]
    dtypes = {dtype_name(v) for v in [*op.outputs, *computed] if hasattr(v, "dtype")}
    if "int32" in dtypes:
        return ANE_DTYPE_RULES["int32"]
    if "bool" in dtypes:
        return ANE_DTYPE_RULES["bool"]
    if "fp32" in {dtype_name(v) for v in op.outputs}:  # all of an FP32 program; FP16 keeps few ops in fp32
        return ANE_DTYPE_RULES["fp32"]
    return None


def neural_engine_report(program: Any) -> dict[str, dict[str, Any]]:
    """Op type -> {count, reason, source} for the program's ops not expected on the Neural Engine (reasons and
    sources joined with '; ' where instances of one op type fall under different rules)."""
    rules: dict[str, list[AneRule]] = {}
    counts: Counter[str] = Counter()
    for op in operations(program.functions["main"]):
        rule = _ane_rule(op) if op.op_type != "const" else None
        if rule is not None:
            counts[op.op_type] += 1
            if rule not in rules.setdefault(op.op_type, []):
                rules[op.op_type].append(rule)
    return {
        op: {
            "count": counts[op],
            "reason": "; ".join(rule.reason for rule in rules[op]),
            "source": "; ".join(dict.fromkeys(rule.source for rule in rules[op])),
        }
        for op in sorted(counts)
    }


def feature_facts(features: Any) -> dict[str, dict[str, Any]]:
    """Shape and numpy dtype of each of a spec's features (its inputs or outputs), by Core ML name."""
    return {
        f.name: {
            "shape": [int(d) for d in f.type.multiArrayType.shape],
            "dtype": ARRAY_DTYPES.get(f.type.multiArrayType.dataType, "unknown"),
        }
        for f in features
    }
