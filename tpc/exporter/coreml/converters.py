"""torch -> MIL converters for what coremltools' torch frontend lacks or mis-converts, tpc's select op first.

Converting every zoo model with every method it accepts needed fixes for ops coremltools 9.0 lacks or
mis-converts (alias, bool `|`, index_fill, GQA attention, `dtype=` of creation ops, bool scatter, argmax ties);
each converter's docstring says what and why, and docs/coreml.md has the table. `register_converters()` installs
them into coremltools' torch frontend; it runs when this module is imported after coremltools and at every
export, and is idempotent (a second call or a reload replaces the same entries; wrappers keep coremltools'
original, they never stack). coremltools is imported inside the functions: it takes seconds and is an optional
extra, so a plain `import tpc` (or of this module) does not pay for it.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

SELECT_OP = "tpc::select_tokens"
INT16_MAX = 32767


def _select_tokens(context: Any, node: Any) -> None:
    """MIL lowering of `tpc::select_tokens(scores, tokens, k)` in Core ML's own `topk`/`gather` ops (the program is
    decomposed with an empty table, so the op reaches coremltools as one node; Core ML has no float64 for the ATen
    form). With B, N static and i the token index:

        key       = select(not_equal(scores, scores), -inf, scores)          # NaN -> -inf, in the scores' float type
        threshold = topk(key, k, descending).values[:, k-1]                   # the K-th best key
        priority  = select(key > threshold, 2N - i, select(key == threshold, N - i, 0))   # int32, no ties above 0
        best      = topk(priority, k, descending).indices                     # the kept set
        kept      = topk(best, k, ascending).values                           # the same K indices, ascending
        kept_tokens = gather(tokens, kept, axis=1, batch_dims=1)

    Equivalence with the ONNX lowering (`tpc.ops.select`: float64 key -> TopK -> ascending TopK -> Gather) and
    with tpc's rule (higher score first, equal scores -> lower index, NaN below every number):
      * both keep every token whose key is above the K-th best key, and fill the rest of the budget with the
        tokens equal to it, lowest index first. ONNX gets "lowest index first" from its TopK specification ("the
        lower index wins" among equal values). Core ML's MIL `topk` (iOS15/16/17 definitions, coremltools 9.0
        `mil/ops/defs/iOS1x/tensor_operation.py`) says nothing about equal values: its tie order is unspecified.
        So the tie rule is built into an integer priority instead: 2N - i above the threshold, N - i at it, 0
        below. Every token that can be kept has a distinct positive priority and at least K of them are
        positive, so the second topk's result does not depend on how Core ML orders ties (tests/test_coreml.py
        runs the MIL program with a topk that breaks ties backwards and at random). The first topk contributes
        only a value (the K-th best), which ties cannot change;
      * the third topk sorts K distinct indices ascending (no ties), as ONNX's ascending TopK does; `torch.sort`
        is avoided for the same reason as everywhere in tpc;
      * NaN -> -inf puts NaN below every number, as the ONNX key does. That key is float64 (NaN -> -inf, -inf ->
        2 * float32.min, so NaN < -inf); Core ML has no float64, so -inf is not moved. The one deviation: a NaN
        score and a -inf score are equal keys here, ordered by index, instead of "-inf above NaN";
      * FP16 compute (`--dtype fp16`): the key is computed and rounded in fp16 like every float; two scores that
        differ only below fp16 resolution tie, and the lower index wins. Where the eager fp16 model computes a
        score in fp32 (HiPrune's attention taps accumulate in fp32), such near-ties may resolve differently:
        `tpc verify` reports that as a selection flip, not drift. coremltools' pass add_int16_cast narrows topk's
        int32 inputs to int16 under FP16 compute, so the priority (up to 2N) limits the op to N <= 16383 tokens,
        checked here.
    Constant scores (Random, Uniform, the unpruned baseline) are folded by coremltools at conversion time, so
    those programs hold constant indices and a gather, no topk.
    """
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
