"""The rewrites of the traced ExportedProgram before coremltools converts it, as graph passes (`graph_pass`).

`CoreMLTarget.passes` lists them in order: `Decompose` first (it turns `.to(dtype)` into the `_to_copy` that
`EmulateBfloat16` rewrites), then `EmulateBfloat16` (Core ML has no bfloat16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.export import ExportedProgram

from tpc.exporter.graph_pass import GraphPass

BF16_PREFIX = "tpc_bf16"  # FX (and so MIL) names of the rounding ops; FP16 compute leaves them in fp32
# Veltkamp splitting: with s = 2**16 + 1, c = x * s and c - (c - x) is x rounded to 24 - 16 = 8 significant bits,
# round-to-nearest-even, which is float32 -> bfloat16 -> float32 (measured bit-equal to torch on 1.7 M random
# float32 values in [1e-30, 1e30], 155 k of them exact ties). Deviations, far outside the values tpc rounds
# (VLA-Pruner's normalised guide, in [0, 1]): |x| >= 2**100 (where x * s could overflow) passes unrounded, and
# float32 subnormals are rounded at float32's subnormal precision, not bfloat16's. NaN and +-inf pass unchanged.
_VELTKAMP = float(2**16 + 1)
_BF16_ROUND_LIMIT = float(2**100)


class Decompose(GraphPass[ExportedProgram]):
    """`run_decompositions({})`: the ATen form coremltools converts. The empty table keeps `tpc::select_tokens`
    one opaque node, which `converters` lowers to Core ML's own `topk`/`gather` instead of an ATen decomposition
    in float64 (Core ML has no float64)."""

    name = "decompose"

    def call(self, program: ExportedProgram) -> ExportedProgram:
        return program.run_decompositions({})


def _is_bfloat16(node: Any) -> bool:
    value = node.meta.get("val")
    return node.op == "call_function" and isinstance(value, Tensor) and value.dtype == torch.bfloat16


def _is_bfloat16_assert(node: Any) -> bool:
    return node.target == torch.ops.aten._assert_tensor_metadata.default and torch.bfloat16 in (
        *node.args,
        *node.kwargs.values(),
    )


class EmulateBfloat16(GraphPass[ExportedProgram]):
    """Replace float32 -> bfloat16 casts by the same rounding in float32 (Core ML has no bfloat16; coremltools 9.0
    fails with `KeyError: torch.bfloat16` while reading the graph). The value keeps float32 storage, so the cast
    back to float32 that follows is a no-op. Arithmetic *in* bfloat16 is refused: rounding only at the casts would
    not reproduce it."""

    name = "emulate_bfloat16"

    def requires(self, program: ExportedProgram) -> None:
        for node in filter(_is_bfloat16, program.graph_module.graph.nodes):
            if node.target != torch.ops.aten._to_copy.default:
                raise NotImplementedError(f"'{node.name}' ({node.target}) computes in bfloat16, which Core ML lacks")
            (source,) = node.args
            if source.meta["val"].dtype != torch.float32:
                raise NotImplementedError(f"'{node.name}': only float32 -> bfloat16 casts are emulated for Core ML")

    def call(self, program: ExportedProgram) -> ExportedProgram:
        graph = program.graph_module.graph
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if _is_bfloat16_assert(node):
                graph.erase_node(node)
                changed = True
            elif _is_bfloat16(node):
                (source,) = node.args
                with graph.inserting_before(node):
                    rounded = _bf16_round(graph, source, node.name)
                node.replace_all_uses_with(rounded)
                graph.erase_node(node)
                changed = True
        if changed:
            program.graph_module.recompile()
        return program

    def ensures(self, program: ExportedProgram) -> None:
        left = [node.name for node in program.graph_module.graph.nodes if _is_bfloat16(node)]
        if left:
            raise RuntimeError(f"bfloat16 values remain: {left}")


def _bf16_round(graph: Any, x: Any, name: str) -> Any:
    aten = torch.ops.aten
    example = x.meta["val"]

    def add(target: Any, args: tuple, suffix: str, dtype: torch.dtype = torch.float32) -> Any:
        node = graph.call_function(target, args)
        node.name = f"{BF16_PREFIX}_{name}_{suffix}"
        node.meta["val"] = torch.empty_like(example, dtype=dtype)
        return node

    magnitude = add(aten.abs.default, (x,), "abs")
    in_range = add(aten.lt.Scalar, (magnitude, _BF16_ROUND_LIMIT), "in_range", torch.bool)
    scaled = add(aten.mul.Tensor, (x, _VELTKAMP), "scaled")
    excess = add(aten.sub.Tensor, (scaled, x), "excess")
    rounded = add(aten.sub.Tensor, (scaled, excess), "rounded")
    return add(aten.where.self, (in_range, rounded, x), "select")
