"""Core ML target: torch.export -> coremltools (ML program, static shapes) -> `.mlpackage`, plus the facts tpc checks.

Pipeline. `torch.export.export(module, strict=False).run_decompositions({})` and `coremltools.convert` on the
resulting ExportedProgram. Not the TorchScript path: `torch.jit.trace` + coremltools fails under numpy 2.4, and
ExportedProgram is what coremltools develops against now. The empty decomposition table keeps
`tpc::select_tokens` as one opaque node, which this module lowers to MIL itself (below), so the selection is
expressed in Core ML's own `topk`/`gather` ops instead of an ATen decomposition in float64 (Core ML has no
float64). Shapes are static: no `RangeDim`/`EnumeratedShapes`, and `check_static_program` fails the export
if any MIL value has a symbolic dimension or any op's output size could depend on data.

Precision. An ML program is typed: `compute_precision=FLOAT16` makes coremltools insert fp16 casts around
every float op (weights are stored fp16); `FLOAT32` keeps everything fp32. tpc's `--dtype fp16` means Core
ML's default precision (FP16 compute), `fp32` means FP32 compute. An fp16 module is converted from an fp32
copy with FP16 compute precision, because that is the route coremltools is built for: converting the fp16
ExportedProgram itself trips over converters that mix an fp32 constant into fp16 values (e.g. the bool
attention-mask path of `scaled_dot_product_attention`: "sub ... y has dtype fp16 whereas x has dtype fp32",
measured with coremltools 9.0). The copy is traced behind fp16 inputs (`Fp32Compute`), so an fp16 export's
float inputs and outputs are fp16, as the eager fp16 model's are, and an fp32 export's are fp32. Integer I/O is
int32 (Core ML has no int64); `tpc.runtimes.coreml` casts int64 <-> int32.

Names. ML program feature names must match `[A-Za-z_][A-Za-z0-9_]*` (coremltools enforces this), so tpc names
such as `past.0.key` become `past_0_key`. The map (Core ML name -> tpc name) and each output's eager dtype are
stored in the model's user-defined metadata, so a runtime without tpc's manifest can still undo both.

The select composite. `tpc::select_tokens(scores, tokens, k)` becomes (B, N static; i = token index)

    key       = select(not_equal(scores, scores), -inf, scores)          # NaN -> -inf, in the scores' float type
    threshold = topk(key, k, descending).values[:, k-1]                   # the K-th best key
    priority  = select(key > threshold, 2N - i, select(key == threshold, N - i, 0))   # int32, no ties above 0
    best      = topk(priority, k, descending).indices                     # the kept set
    kept      = topk(best, k, ascending).values                           # the same K indices, ascending
    kept_tokens = gather(tokens, kept, axis=1, batch_dims=1)

Equivalence with the ONNX lowering (`tpc.ops.select`: float64 key -> TopK -> ascending TopK -> Gather) and with
tpc's rule (higher score first, equal scores -> lower index, NaN below every number):
  * both keep every token whose key is above the K-th best key, and fill the rest of the budget with the tokens
    equal to it, lowest index first. ONNX gets "lowest index first" from its TopK specification ("the lower
    index wins" among equal values). Core ML's MIL `topk` (iOS15/16/17 definitions, coremltools 9.0
    `mil/ops/defs/iOS1x/tensor_operation.py`) documents k, axis, ascending, sort, return_indices and the index
    dtype and says nothing about equal values: its tie order is unspecified. So the tie rule is built into an
    integer priority instead: 2N - i above the threshold, N - i at it, 0 below. Every token that can be kept has
    a distinct positive priority and at least K of them are positive, so the second topk's result does not
    depend on how Core ML orders ties (tests/test_coreml.py runs the MIL program with a topk that breaks ties
    backwards and at random). The first topk contributes only a value (the K-th best), which ties cannot change;
  * the third topk sorts K distinct indices ascending (no ties), as ONNX's ascending TopK does; `torch.sort`
    is avoided for the same reason as everywhere in tpc;
  * NaN -> -inf puts NaN below every number, as the ONNX key does. That key is float64 (NaN -> -inf, -inf ->
    2 * float32.min, so NaN < -inf); Core ML has no float64, so -inf is not moved. The one deviation: a NaN score
    and a -inf score are equal keys here, ordered by index, instead of "-inf above NaN";
  * FP16 compute (`--dtype fp16`): the key is computed and rounded in fp16 like every float; two scores that
    differ only below fp16 resolution tie, and the lower index wins. Where the eager fp16 model computes a score
    in fp32 (HiPrune's attention taps accumulate in fp32), such near-ties may resolve differently: `tpc verify`
    reports that as a selection flip, not drift. coremltools' pass add_int16_cast narrows topk's int32 inputs to
    int16 under FP16 compute, so the priority (up to 2N) limits the op to N <= 16383 tokens, checked here.
Constant scores (Random, Uniform, the unpruned baseline) are folded by coremltools at conversion time, so those
programs hold constant indices and a gather, no topk.

Related tie rule. torch's argmax/argmin return the first index among equal extremes, and DivPrune's greedy
relies on it (its symmetrised distances tie exactly); MIL's `reduce_argmax` says "in case of ties, the identity
of the return value is not guaranteed". `_first_index_arg_extreme` lowers argmax/argmin so that reduce_argmax
never sees a tie.

Converters. Besides the select op, converting every zoo model with every method it accepts needed fixes for ops
coremltools 9.0 lacks or mis-converts (alias, bool `|`, index_fill, GQA attention, `dtype=` of creation ops, bool
scatter, argmax ties, bfloat16 casts, stride-0 example inputs); each converter's docstring says what and why, and
docs/coreml.md has the table. `register_converters()` installs them into coremltools' torch frontend; it runs
when this module is imported after coremltools and at every export, and is idempotent (a second call or a
reload replaces the same entries; wrappers keep coremltools' original, they never stack). A plain `import tpc`
does not import coremltools: that takes seconds and is an optional extra.

Neural Engine. `neural_engine` in the facts lists the program's ops that are not expected to run on the ANE,
with the reason and where that is stated (`ANE_OP_RULES`, `ANE_DTYPE_RULES`). Apple publishes no per-op list:
placement depends on the device generation, OS version and tensor shapes (Apple's reply in
apple/coremltools#1780), so this is a static, conservative estimate; on a Mac, `MLComputePlan` reports the real
per-op device (the macOS device tests print it).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import sys
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tpc.exporter.base import Target, export_program
from tpc.exporter.onnx import StaticShapeError
from tpc.runtimes.coreml import (
    ARRAY_DTYPES,
    COMPUTE_UNITS,
    COMPUTE_UNITS_KEY,
    NAMES_KEY,
    OUTPUT_DTYPES_KEY,
    check_compute_units,
)

# iOS17 / macOS14 (2023). iOS16 is the floor: `gather` with `batch_dims` (the token gather), `topk` with `sort`
# and `return_indices`, and fp16 model inputs/outputs are iOS16 opset features. iOS17 because its opset adds
# 16-bit integer types to `topk`/`gather`, and with it coremltools (pass add_int16_cast, FP16 compute) narrows
# the selection's int32 indices to int16/uint16, the 16-bit form the Neural Engine works in (apple/coremltools
# #2365); with iOS16 they stay int32. Not iOS18: nothing here needs it (its fused `scaled_dot_product_attention`
# op is not used when a `scale` is given, which transformers always passes, and its stateful KV cache does not
# fit tpc's explicit cache-in/cache-out components), and it would drop 2023 devices.
DEPLOYMENT_TARGET = "iOS17"
FORMAT = "mlprogram"

SELECT_OP = "tpc::select_tokens"
GATHER_OPS = frozenset({"gather", "gather_along_axis", "gather_nd"})
# MIL ops whose output size depends on data, or whose control flow does: never in a static tpc graph.
DATA_DEPENDENT_OPS = frozenset({"non_zero", "while_loop", "cond", "make_list", "list_read", "list_write"})
INT16_MAX = 32767
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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


def coreml_name(name: str) -> str:
    """A tpc I/O name as an ML program feature name: every character outside [A-Za-z0-9_] becomes '_'."""
    sanitized = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return sanitized if _NAME_PATTERN.fullmatch(sanitized) else f"_{sanitized}"


def io_names(names: list[str]) -> dict[str, str]:
    """{tpc name: Core ML name}; two tpc names that sanitize alike would be indistinguishable, so refuse them."""
    mapping = {name: coreml_name(name) for name in names}
    clashes = [n for n, count in Counter(mapping.values()).items() if count > 1]
    if clashes:
        raise ValueError(f"I/O names {sorted(clashes)} collide once made valid Core ML feature names")
    return mapping


# --- converters ------------------------------------------------------------------------------------------------


def _select_tokens(context: Any, node: Any) -> None:
    """MIL lowering of `tpc::select_tokens` (see the module docstring for why it equals tpc's rule)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    scores, tokens, k = _get_inputs(context, node, expected=3)
    k = int(k.val)
    if scores.rank != 2 or tokens.rank != 3 or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"{SELECT_OP}: expected scores (B, N), tokens (B, N, D) and 1 <= k <= N, got k={k}")
    batch, num_tokens = scores.shape
    if 2 * num_tokens > INT16_MAX:  # FP16 programs narrow topk's int32 input to int16 (pass add_int16_cast)
        raise NotImplementedError(f"{SELECT_OP}: {num_tokens} tokens; Core ML's lowering takes <= {INT16_MAX // 2}")
    negative_infinity = np.array(-np.inf, dtype=types.nptype_from_builtin(scores.dtype))
    is_nan = mb.not_equal(x=scores, y=scores, name=f"{node.name}_isnan")
    key = mb.select(cond=is_nan, a=negative_infinity, b=scores, name=f"{node.name}_key")
    # the K-th best key, then an integer priority without ties: above it 2N - i, equal to it N - i, else 0
    values = mb.topk(x=key, k=k, axis=-1, ascending=False, sort=True, return_indices=False, name=f"{node.name}_top")
    threshold = mb.slice_by_index(x=values, begin=[0, k - 1], end=[batch, k], name=f"{node.name}_threshold")
    index = np.arange(num_tokens, dtype=np.int32)
    full = (batch, num_tokens)  # MIL's select takes its output shape from `a`/`b`, so one of them is full size
    at_threshold = mb.equal(x=key, y=threshold, name=f"{node.name}_at_threshold")
    above = mb.greater(x=key, y=threshold, name=f"{node.name}_above")
    tied = mb.select(
        cond=at_threshold, a=np.broadcast_to(num_tokens - index, full).copy(), b=np.int32(0), name=f"{node.name}_tied"
    )
    priority = mb.select(
        cond=above, a=np.broadcast_to(2 * num_tokens - index, full).copy(), b=tied, name=f"{node.name}_priority"
    )
    _, best = mb.topk(x=priority, k=k, axis=-1, ascending=False, sort=True, name=f"{node.name}_best")
    kept, _ = mb.topk(x=best, k=k, axis=-1, ascending=True, sort=True, name=f"{node.name}_ascending")
    kept_tokens = mb.gather(x=tokens, indices=kept, axis=1, batch_dims=1, name=f"{node.name}_gather")
    context.add((kept, kept_tokens), torch_name=node.name)


def _alias(context: Any, node: Any) -> None:
    """`aten.alias` (a view that shares storage; left by functionalization): the same value in a functional IR."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    context.add(_get_inputs(context, node, expected=1)[0], torch_name=node.name)


def _or(context: Any, node: Any) -> None:
    """`aten.__or__` of bool masks (`a | b`, DivPrune's picked set): `logical_or`. Core ML has no bitwise ops, so
    an integer `|` (traced output not bool) is refused rather than silently made logical."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    value = (node.meta or {}).get("val")
    if not isinstance(value, Tensor) or value.dtype != torch.bool:
        raise NotImplementedError(f"'{node.name}': bitwise | on integer tensors has no Core ML equivalent")
    x, y = (mb.cast(x=v, dtype="bool") for v in _get_inputs(context, node, expected=2))
    context.add(mb.logical_or(x=x, y=y, name=node.name))


def _index_fill(context: Any, node: Any) -> None:
    """`x.index_fill(dim, index, value)` with constant indices (the Uniform baseline's priorities): a constant
    mask along `dim` and a `select`. Computed indices would need a scatter; none of tpc's graphs has them."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    x, dim, index, value = _get_inputs(context, node, expected=4)
    if index.val is None:
        raise NotImplementedError(f"'{node.name}': index_fill with computed indices is not supported for Core ML")
    axis = int(dim.val) % x.rank
    mask_shape = [1] * x.rank
    mask_shape[axis] = x.shape[axis]
    mask = np.zeros(x.shape[axis], dtype=bool)
    mask[np.asarray(index.val).reshape(-1)] = True
    fill = np.array(value.val, dtype=types.nptype_from_builtin(x.dtype))
    context.add(mb.select(cond=mask.reshape(mask_shape), a=fill, b=x, name=node.name))


def _sdpa_with_gqa(original: Any) -> Any:
    """coremltools' `scaled_dot_product_attention` ignores `enable_gqa` (grouped-query attention, Llama's
    prefill): repeat each key/value head `query_heads // kv_heads` times, as PyTorch does, then convert."""

    def convert(context: Any, node: Any) -> None:
        from coremltools.converters.mil import Builder as mb

        inputs, kwinputs = list(node.inputs), dict(node.kwinputs or {})
        gqa = kwinputs.pop("enable_gqa", None)
        if len(inputs) > 7:  # positional: q, k, v, mask, dropout, is_causal, scale, enable_gqa
            gqa, inputs = [inputs[7]], inputs[:7]
        enabled = False
        if gqa is not None:
            flag = gqa[0]
            enabled = bool(context[flag].val if isinstance(flag, str) else getattr(flag, "val", flag))
        if enabled:
            query, key, value = (context[name] for name in inputs[:3])
            heads, kv_heads = query.shape[-3], key.shape[-3]
            if heads != kv_heads:
                for position, tensor in ((1, key), (2, value)):
                    shape = list(tensor.shape)
                    tiled = mb.tile(
                        x=mb.expand_dims(x=tensor, axes=[-3]), reps=[1] * (len(shape) - 2) + [heads // kv_heads, 1, 1]
                    )
                    name = f"{node.name}_{'key' if position == 1 else 'value'}_gqa"
                    repeated = mb.reshape(x=tiled, shape=[*shape[:-3], heads, *shape[-2:]], name=name)
                    context.add(repeated)
                    inputs[position] = repeated.name
        patched = copy.copy(node)
        patched.inputs, patched.kwinputs = inputs, kwinputs or None
        original(context, patched)

    return convert


def _traced_dtype(original: Any) -> Any:
    """Creation ops whose coremltools converter drops the `dtype=` keyword of the ExportedProgram form
    (`arange(16, 0, -1, dtype=float32)` stays int32 and then fails DivPrune's float `scatter`;
    `zeros_like(x, dtype=bool)` stays float and breaks a later `|`): cast the result to the dtype the traced
    node has (float -> fp32: the program is fp32, FP16 compute casts come later)."""

    def convert(context: Any, node: Any) -> None:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        original(context, node)
        value = (node.meta or {}).get("val")
        if not isinstance(value, Tensor):
            return
        result = context[node.name]
        if value.dtype == torch.bool:
            wanted = None if types.is_bool(result.dtype) else "bool"
        elif value.dtype.is_floating_point:
            wanted = None if types.is_float(result.dtype) else "fp32"
        else:
            wanted = None if types.is_int(result.dtype) else "int32"
        if wanted is not None:
            cast = mb.cast(x=result, dtype=wanted, name=f"{node.name}_as_{wanted}")
            context.add(cast, torch_name=node.name, override=True)

    return convert


def _first_index_arg_extreme(original: Any) -> Any:
    """torch's argmax/argmin return the first index among equal extremes (DivPrune's documented tie rule: its
    symmetrised distances make two mutual nearest neighbours tie exactly); MIL's `reduce_argmax` says "in case of
    ties, the identity of the return value is not guaranteed". So: mark the entries equal to the extreme, give
    them N - index (distinct, largest for the first), and take the argmax of that, which has no ties. Integer
    inputs keep coremltools' conversion. NaN inputs are outside the rule (torch treats NaN as the maximum)."""

    def convert(context: Any, node: Any) -> None:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
        from coremltools.converters.mil.mil import types
        from coremltools.converters.mil.mil.types.symbolic import any_symbolic

        inputs = _get_inputs(context, node, expected=(1, 2, 3, 4))
        x = inputs[0]
        dim = _get_kwinputs(context, node, "dim", default=[inputs[1] if len(inputs) > 1 else None])[0]
        keepdim = _get_kwinputs(context, node, "keepdim", default=[inputs[2] if len(inputs) > 2 else False])[0]
        dim = dim.val if hasattr(dim, "val") else dim
        keepdim = bool(keepdim.val if hasattr(keepdim, "val") else keepdim)
        if not types.is_float(x.dtype) or any_symbolic(x.shape) or node.kind not in ("argmax", "argmin"):
            original(context, node)
            return
        if dim is None:  # over all elements (coremltools would reduce the last axis only)
            x, dim, keepdim = mb.reshape(x=x, shape=[-1], name=f"{node.name}_flat"), 0, False
        axis = int(dim) % x.rank
        size = x.shape[axis]
        reduce = mb.reduce_max if node.kind == "argmax" else mb.reduce_min
        extreme = reduce(x=x, axes=[axis], keep_dims=True, name=f"{node.name}_extreme")
        at_extreme = mb.equal(x=x, y=extreme, name=f"{node.name}_at_extreme")
        shape = [1] * x.rank
        shape[axis] = size
        # full shape: MIL's `select` infers its output shape from `a` and `b` only, not from `cond`
        first_largest = np.broadcast_to((size - np.arange(size, dtype=np.int32)).reshape(shape), x.shape).copy()
        candidates = mb.select(cond=at_extreme, a=first_largest, b=np.int32(0), name=f"{node.name}_candidates")
        context.add(mb.reduce_argmax(x=candidates, axis=axis, keep_dims=keepdim, name=node.name))

    return convert


def _bool_scatter(original: Any) -> Any:
    """MIL `scatter_along_axis` takes fp16/fp32/int32 data only; a bool mask scattered with True (VLA-Pruner's
    `zeros(bool).scatter(1, kept, True)`) is done in int32 and cast back."""

    def convert(context: Any, node: Any) -> None:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        inputs = list(node.inputs)
        data = context[inputs[0]]
        if not types.is_bool(data.dtype):
            original(context, node)
            return
        for position in (0, 3):
            item = inputs[position]
            if isinstance(item, bool):
                inputs[position] = int(item)
            elif isinstance(item, str) and types.is_bool(context[item].dtype):
                as_int = mb.cast(x=context[item], dtype="int32", name=f"{node.name}_{position}_as_int32")
                context.add(as_int)
                inputs[position] = as_int.name
        patched = copy.copy(node)
        patched.inputs = inputs
        original(context, patched)
        as_bool = mb.cast(x=context[node.name], dtype="bool", name=f"{node.name}_as_bool")
        context.add(as_bool, torch_name=node.name, override=True)

    return convert


SCATTER_OPS = ("scatter", "scatter.src", "scatter.value", "scatter.reduce", "scatter.value_reduce")
# Converters wrapped by `_traced_dtype` (those present in the installed coremltools).
TRACED_DTYPE_OPS = (
    "arange",
    "arange.start",
    "arange.start_step",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
)


def _registry() -> Any:
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    return _TORCH_OPS_REGISTRY


def _install(names: tuple[str, ...], func: Any) -> None:
    """Map each name to `func`; the lookup goes through coremltools' name sanitizer ('__or__' -> 'or'), the
    support check through the raw kind, so both spellings are set. Re-installing replaces, never stacks."""
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    func._tpc_converter = True
    for name in names:
        for key in {name, sanitize_op_kind(name)}:
            _registry().set_func_by_name(func, key)


def _wrap(name: str, make: Any) -> None:
    """Replace coremltools' converter for `name` by `make(original)`; an already wrapped one keeps its original."""
    current = _registry().get_func(name)
    original = getattr(current, "_tpc_original", current)
    wrapped = make(original)
    wrapped._tpc_original = original
    _install((name,), wrapped)


def _install_if_missing(name: str, func: Any) -> None:
    """Only fill a gap: a later coremltools that converts `name` itself keeps its own converter."""
    current = _registry().get_func(name)
    if current is None or getattr(current, "_tpc_converter", False):
        _install((name,), func)


_registered = False


def register_converters() -> None:
    """Teach coremltools' torch frontend tpc's op and the ops tpc graphs contain that it lacks or mis-converts.

    Idempotent (a second call, or a reload of this module, replaces the same entries). Called when this module
    is imported after coremltools, and by every export; kept out of a plain import of tpc because importing
    coremltools costs seconds and is an optional extra.
    """
    global _registered
    _install((SELECT_OP, "tpc_select_tokens"), _select_tokens)
    _install_if_missing("alias", _alias)
    _install_if_missing("__or__", _or)
    for name in ("index_fill", "index_fill.int_scalar", "index_fill.int_tensor"):
        _install_if_missing(name, _index_fill)
    _wrap("scaled_dot_product_attention", _sdpa_with_gqa)
    for name in SCATTER_OPS:
        _wrap(name, _bool_scatter)
    for name in ("argmax", "argmin"):
        _wrap(name, _first_index_arg_extreme)
    for name in TRACED_DTYPE_OPS:
        if _registry().get_func(name) is not None:
            _wrap(name, _traced_dtype)
    _registered = True


if "coremltools" in sys.modules:  # imported after coremltools: converters are available to the caller at once
    register_converters()


# --- bfloat16 ----------------------------------------------------------------------------------------------------

BF16_PREFIX = "tpc_bf16"  # FX (and so MIL) names of the rounding ops; FP16 compute leaves them in fp32
# Veltkamp splitting: with s = 2**16 + 1, c = x * s and c - (c - x) is x rounded to 24 - 16 = 8 significant bits,
# round-to-nearest-even, which is float32 -> bfloat16 -> float32 (measured bit-equal to torch on 1.7 M random
# float32 values in [1e-30, 1e30], 155 k of them exact ties). Deviations, far outside the values tpc rounds
# (VLA-Pruner's normalised guide, in [0, 1]): |x| >= 2**100 (where x * s could overflow) passes unrounded, and
# float32 subnormals are rounded at float32's subnormal precision, not bfloat16's. NaN and +-inf pass unchanged.
_VELTKAMP = float(2**16 + 1)
_BF16_ROUND_LIMIT = float(2**100)


def emulate_bfloat16(program: Any) -> Any:
    """Replace float32 -> bfloat16 casts by the same rounding in float32 (Core ML has no bfloat16; coremltools 9.0
    fails with `KeyError: torch.bfloat16` while reading the graph). The value keeps float32 storage, so the cast
    back to float32 that follows is a no-op. Arithmetic *in* bfloat16 is refused: rounding only at the casts would
    not reproduce it."""
    graph = program.graph_module.graph
    aten = torch.ops.aten
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        value = node.meta.get("val")
        if node.target == aten._assert_tensor_metadata.default and torch.bfloat16 in (
            *node.args,
            *node.kwargs.values(),
        ):
            graph.erase_node(node)
            continue
        if not (isinstance(value, Tensor) and value.dtype == torch.bfloat16):
            continue
        if node.target != aten._to_copy.default:
            raise NotImplementedError(f"'{node.name}' ({node.target}) computes in bfloat16, which Core ML lacks")
        (source,) = node.args
        if source.meta["val"].dtype != torch.float32:
            raise NotImplementedError(f"'{node.name}': only float32 -> bfloat16 casts are emulated for Core ML")
        with graph.inserting_before(node):
            rounded = _bf16_round(graph, source, node.name)
        node.replace_all_uses_with(rounded)
        graph.erase_node(node)
        changed = True
    if changed:
        program.graph_module.recompile()
    return program


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


# --- program checks and facts ----------------------------------------------------------------------------------


def _operations(block: Any) -> Iterator[Any]:
    """Every op of a block and of the blocks nested in its ops; MIL program objects and their protobuf spec
    have the same shape (`operations`, `blocks`), so this walks both."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def _dtype_name(var: Any) -> str:
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
        for op in _operations(function):
            if op.op_type in DATA_DEPENDENT_OPS:
                raise StaticShapeError(f"MIL op '{op.name}' is {op.op_type}, whose output depends on data")
            for var in op.outputs:
                if types.is_tensor(var.sym_type) and any_symbolic(var.shape):
                    raise StaticShapeError(f"MIL value '{var.name}' ({op.op_type}) has a non-static shape {var.shape}")


def mil_op_counts(program: Any) -> dict[str, int]:
    """Op type -> count over the main function, `const` (weights and literals) left out."""
    counts = Counter(op.op_type for op in _operations(program.functions["main"]) if op.op_type != "const")
    return dict(sorted(counts.items()))


def select_chains(program: Any, max_depth: int = 12) -> list[str]:
    """Each shortest data path from a `topk` to the `indices` of a `gather*`, as 'topk(name) -> ... -> gather(name)'.

    The proof that the selection survived conversion as Core ML's own top-k feeding a gather; sub-paths of a
    longer path (the ascending topk alone) are folded into it.
    """
    operations = list(_operations(program.functions["main"]))
    consumers: dict[int, list[tuple[Any, str]]] = {}
    for op in operations:
        for input_name, bound in op.inputs.items():
            for var in bound if isinstance(bound, (list, tuple)) else [bound]:
                consumers.setdefault(id(var), []).append((op, input_name))
    chains: list[list[Any]] = []
    for start in (op for op in operations if op.op_type == "topk"):
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
    dtypes = {_dtype_name(v) for v in [*op.outputs, *computed] if hasattr(v, "dtype")}
    if "int32" in dtypes:
        return ANE_DTYPE_RULES["int32"]
    if "bool" in dtypes:
        return ANE_DTYPE_RULES["bool"]
    if "fp32" in {_dtype_name(v) for v in op.outputs}:  # all of an FP32 program; FP16 keeps few ops in fp32
        return ANE_DTYPE_RULES["fp32"]
    return None


def neural_engine_report(program: Any) -> dict[str, dict[str, Any]]:
    """Op type -> {count, reason, source} for the program's ops not expected on the Neural Engine (reasons and
    sources joined with '; ' where instances of one op type fall under different rules)."""
    rules: dict[str, list[AneRule]] = {}
    counts: Counter[str] = Counter()
    for op in _operations(program.functions["main"]):
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


def _feature_facts(features: Any) -> dict[str, dict[str, Any]]:
    return {
        f.name: {
            "shape": [int(d) for d in f.type.multiArrayType.shape],
            "dtype": ARRAY_DTYPES.get(f.type.multiArrayType.dataType, "unknown"),
        }
        for f in features
    }


# --- spec editing ----------------------------------------------------------------------------------------------


def _program_names(spec: Any) -> set[str]:
    names: set[str] = set()
    for function in spec.mlProgram.functions.values():
        names.update(value.name for value in function.inputs)
        for block in function.block_specializations.values():
            for op in _operations(block):
                names.update(value.name for value in op.outputs)
    return names


def _rename(spec: Any, old: str, new: str) -> None:
    """Rename one value everywhere in an ML program spec (features, function inputs, block outputs, op bindings).

    coremltools' `rename_feature` does this for features only, and would silently merge a feature with an internal
    value that already has the new name; `name_features` moves such values aside first."""
    for feature in (*spec.description.input, *spec.description.output):
        if feature.name == old:
            feature.name = new
    for function in spec.mlProgram.functions.values():
        for value in function.inputs:
            if value.name == old:
                value.name = new
        for block in function.block_specializations.values():
            block.outputs[:] = [new if name == old else name for name in block.outputs]
            for op in _operations(block):
                for argument in op.inputs.values():
                    for binding in argument.arguments:
                        if binding.HasField("name") and binding.name == old:
                            binding.name = new
                for value in op.outputs:
                    if value.name == old:
                        value.name = new


def _append_identity(spec: Any, source: str, new: str) -> None:
    """Append `new = identity(source)` to the main block, typed like `source` (an input or an op's output)."""
    from coremltools.proto import MIL_pb2

    function = spec.mlProgram.functions["main"]
    types = {value.name: value.type for value in function.inputs}
    for block in function.block_specializations.values():
        for op in _operations(block):
            types.update({value.name: value.type for value in op.outputs})
        op = block.operations.add()
        op.type = "identity"
        op.inputs["x"].arguments.add().name = source
        output = op.outputs.add()
        output.name = new
        output.type.CopyFrom(types[source])
        attribute = op.attributes["name"]
        attribute.type.tensorType.dataType = MIL_pb2.STRING
        attribute.immediateValue.tensor.strings.values.append(new)


def name_features(spec: Any, inputs: list[str], outputs: list[str]) -> dict[str, str]:
    """Give the spec's features tpc's names (sanitized), by position; returns {Core ML name: tpc name}.

    The ExportedProgram frontend names inputs after the forward's parameters and outputs after the last MIL op,
    in the program's order, which is the order of `inputs` and `output_names`. An output that returns an input
    unchanged (a teacher-forced graph's `kept_indices`) or repeats another output gets its own value through an
    `identity`, and, where its tpc name is also an input's, the Core ML name `<name>_out`: one value per name.
    """
    current_inputs = [f.name for f in spec.description.input]
    current_outputs = [f.name for f in spec.description.output]
    if len(current_inputs) != len(inputs) or len(current_outputs) != len(outputs):
        raise RuntimeError(
            f"Core ML program has {len(current_inputs)} inputs / {len(current_outputs)} outputs, "
            f"expected {len(inputs)} / {len(outputs)}"
        )
    input_names = io_names(inputs)
    taken = set(input_names.values())
    output_targets = []
    for name, coreml in io_names(list(dict.fromkeys(outputs))).items():
        while coreml in taken:
            coreml = f"{coreml}_out"
        taken.add(coreml)
        output_targets.append((name, coreml))
    output_target = dict(output_targets)
    seen = set(current_inputs)
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    for index, value in enumerate(current_outputs):
        if value in seen:  # give the output a value of its own
            copy_name = f"tpc_io_copy_{index}"
            _append_identity(spec, value, copy_name)
            spec.description.output[index].name = copy_name
            for block in blocks:
                block.outputs[index] = copy_name
            current_outputs[index] = copy_name
        seen.add(current_outputs[index])
    targets = [input_names[n] for n in inputs] + [output_target[n] for n in outputs]
    if len(set(targets)) != len(targets):
        raise ValueError(f"output names {outputs} repeat a name")
    # two passes through fresh names, so that a swap or a clash with an internal value cannot merge two values
    for index, old in enumerate([*current_inputs, *current_outputs]):
        _rename(spec, old, f"tpc_io_{index}")
    internal = _program_names(spec)
    for target in targets:
        if target in internal:  # an internal value already has the name: move it aside
            _rename(spec, target, f"{target}_tpc_internal")
    for index, target in enumerate(targets):
        _rename(spec, f"tpc_io_{index}", target)
    return dict(zip(targets, [*inputs, *outputs], strict=True))


# --- the target ------------------------------------------------------------------------------------------------


def module_precision(module: nn.Module, inputs: dict[str, Tensor]) -> str:
    """'fp16' if the module's parameters or float inputs are half precision (tpc's `--dtype fp16`), else 'fp32'."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    floats += [t.dtype for t in inputs.values() if t.is_floating_point()]
    return "fp16" if any(d in (torch.float16, torch.bfloat16) for d in floats) else "fp32"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools prints progress bars and per-op warnings on stderr; keep them unless the conversion fails."""
    import logging

    logger = logging.getLogger("coremltools")
    level = logger.level
    captured = io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        sys.stderr.write(captured.getvalue()[-4000:])
        raise
    finally:
        logger.setLevel(level)


class Fp32Compute(nn.Module):
    """An fp16 module's fp32 copy behind fp16 inputs: the traced program takes fp16 (so the Core ML model does,
    like the eager fp16 model) and casts them to fp32 first; under FP16 compute coremltools' cast optimization
    then folds fp16 -> fp32 -> fp16 away, so the program starts in fp16 with no cast at all."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> Any:
        return self.module(*(t.float() if t.dtype == torch.float16 else t for t in inputs))


def trace(module: nn.Module, inputs: dict[str, Tensor]) -> tuple[torch.export.ExportedProgram, str]:
    """The program coremltools converts, and the precision ('fp16'/'fp32') it is to run in.

    `export_program` traces row-major copies of the inputs: an expanded sample (stride 0) would reach coremltools
    as a placeholder with a non-contiguous dim order, which it refuses. An fp16 module is traced as an fp32 copy
    behind fp16 inputs (see the module docstring and `Fp32Compute`); the caller's module stays untouched.
    """
    precision = module_precision(module, inputs)
    tensors = inputs
    if precision == "fp16":  # fp16 inputs stay fp16 (bfloat16 ones become fp16: Core ML has no bfloat16)
        module = Fp32Compute(copy.deepcopy(module).float())
        tensors = {k: t.half() if t.dtype == torch.bfloat16 else t for k, t in tensors.items()}
    program = export_program(module, tensors)
    with torch.inference_mode(False), torch.no_grad():
        program = emulate_bfloat16(program.run_decompositions({}))
    return program, precision


def convert(program: torch.export.ExportedProgram, precision: str, compute_units: str = "all") -> Any:
    """coremltools.convert to an ML program (not yet saved), after registering tpc's converters; the returned
    MLModel's `_mil_program` is the program that `check_static_program` and the facts walk."""
    import coremltools as ct

    register_converters()
    compute_precision: Any = ct.precision.FLOAT32
    if precision == "fp16":  # everything in fp16 but the bfloat16 rounding, which needs fp32 arithmetic
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=_fp16_eligible)
    with _quiet():
        return ct.convert(
            program,
            convert_to=FORMAT,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
            compute_precision=compute_precision,
            compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[check_compute_units(compute_units)]),
            skip_model_load=True,  # loading compiles the model: macOS only
        )


class CoreMLTarget(Target):
    name = "coreml"
    suffix = ".mlpackage"
    extra = "coreml"
    requires = ("coremltools",)
    runtime = "coreml"
    options: ClassVar[dict[str, str]] = {
        "compute_units": f"Core ML compute units the model prefers: {', '.join(COMPUTE_UNITS)}"
    }

    def __init__(self, compute_units: str = "all") -> None:
        self.compute_units = check_compute_units(compute_units)

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        """Write `path` (an `.mlpackage` directory) and return its facts for the manifest (module docstring)."""
        import coremltools as ct

        if Path(path).suffix != self.suffix:  # coremltools would append one and write elsewhere
            raise ValueError(f"a Core ML package path must end in {self.suffix}, got '{path}'")
        program, precision = trace(module, inputs)
        mlmodel = convert(program, precision, self.compute_units)
        mil = mlmodel._mil_program
        check_static_program(mil)
        spec = mlmodel.get_spec()
        names = name_features(spec, list(inputs), list(output_names))
        eager_dtypes = (  # an fp16 module's own output dtypes (LLaMA's logits are fp32) need one forward
            _eager_output_dtypes(module, inputs, output_names)
            if precision == "fp16"
            else _output_dtypes(program, output_names)
        )
        metadata = spec.description.metadata.userDefined
        metadata[NAMES_KEY] = json.dumps(names)
        metadata[OUTPUT_DTYPES_KEY] = json.dumps(eager_dtypes)
        metadata[COMPUTE_UNITS_KEY] = self.compute_units
        spec.description.metadata.shortDescription = "exported by tpc (token-pruning compiler)"
        final = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        with _quiet():
            final.save(str(path))
        tpc_name = dict(names)
        return {
            "format": FORMAT,
            "minimum_deployment_target": DEPLOYMENT_TARGET,
            "compute_precision": "FLOAT16" if precision == "fp16" else "FLOAT32",
            "compute_units": self.compute_units,
            "mil_ops": mil_op_counts(mil),
            "inputs": _with_tpc_names(_feature_facts(spec.description.input), tpc_name),
            "outputs": _with_tpc_names(_feature_facts(spec.description.output), tpc_name),
            "select": select_chains(mil),
            "neural_engine": neural_engine_report(mil),
            "versions": {"coremltools": ct.__version__},
        }


def _fp16_eligible(op: Any) -> bool:
    return not op.name.startswith(BF16_PREFIX)


def _with_tpc_names(facts: dict[str, dict[str, Any]], tpc_name: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Key I/O facts by tpc name; where Core ML's feature name differs, record it as `coreml_name`."""
    keyed = {}
    for name, fact in facts.items():
        keyed[tpc_name[name]] = fact if tpc_name[name] == name else {**fact, "coreml_name": name}
    return keyed


def _numpy_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype)


def _output_dtypes(program: Any, output_names: tuple[str, ...]) -> dict[str, str]:
    """Each output's dtype in the traced program: what a runtime hands back (int64 indices and token ids, which
    Core ML returns as int32), exact for an fp32 export."""
    outputs = next(node for node in program.graph.nodes if node.op == "output").args[0]
    return {name: _numpy_dtype(node.meta["val"].dtype) for name, node in zip(output_names, outputs, strict=True)}


def _eager_output_dtypes(module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...]) -> dict[str, str]:
    """An fp16 module's output dtypes, from running it once (its program was traced from an fp32 copy)."""
    with torch.inference_mode(False), torch.no_grad():
        outputs = module(*inputs.values())
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return {name: _numpy_dtype(out.dtype) for name, out in zip(output_names, outputs, strict=True)}
