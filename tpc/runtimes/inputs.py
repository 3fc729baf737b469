"""What the runtime loops accept from a user, checked against the export before any graph runs.

Arrays come as numpy arrays of any float dtype (converted to the dtype the export's graph takes) or as torch
tensors, which are converted with `.detach().cpu().numpy()` by duck typing: this module never imports torch.
Shapes are static (the export's), token ids must be integers inside the vocabulary, and a bad input is one
`UsageError` line naming the layout the export expects. NaN or infinite pixels cannot be pruned or decoded
meaningfully (the kept tokens and the generated ids would be arbitrary): they give a `NonFiniteInputWarning`, or
with `strict=True` a `UsageError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from tpc.errors import UsageError

Shape = Sequence[int | None]  # None: any size on that axis (a loop driven without the export's manifest)


class NonFiniteInputWarning(RuntimeWarning):
    """An input holds NaN or infinity: the export runs, but what it returns for that input means nothing."""


def to_numpy(value: Any, name: str) -> np.ndarray:
    """`value` as a numpy array: numpy arrays and nested lists as they are, torch tensors (or anything with
    `detach`/`cpu`/`numpy`) through `.detach().cpu().numpy()` (bfloat16, which numpy lacks, as float32)."""
    if isinstance(value, np.ndarray):
        return value
    if all(hasattr(value, attr) for attr in ("detach", "cpu", "numpy")):
        tensor = value.detach().cpu()
        if "bfloat16" in str(getattr(tensor, "dtype", "")):
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{name} must be a numpy array or a torch tensor, not {type(value).__name__}: {err}") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise UsageError(f"{name} must be a numeric numpy array or torch tensor, got {type(value).__name__}")
    return array


def describe(array: np.ndarray) -> str:
    """`float64[1, 3, 64, 64]`: what the user passed, in the wording of every message here."""
    return f"{array.dtype}{list(array.shape)}"


def shape_text(shape: Shape) -> str:
    """(1, 3, 64, 64); an axis of any size shows as N."""
    sizes = ["N" if size is None else str(size) for size in shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def _shape_matches(array: np.ndarray, shape: Shape) -> bool:
    if array.ndim != len(shape):
        return False
    return all(want is None or want == got for want, got in zip(shape, array.shape, strict=True))


def check_floats(
    value: Any,
    name: str,
    shape: Shape,
    dtype: str | np.dtype | None,
    layout: str,
    strict: bool = False,
    stacklevel: int = 2,
) -> np.ndarray:
    """A float input (pixel values) of `shape` (axes described by `layout`), converted to `dtype` (None: kept).

    Any float dtype is accepted; integer, boolean or complex arrays are refused (pixel values are normalised
    floats, not 8-bit images). NaN or infinity: a `NonFiniteInputWarning` (`strict`: a UsageError).
    `stacklevel` is the warning's, counted from the caller of this function.
    """
    array = to_numpy(value, name)
    converted_to = f", converted to {np.dtype(dtype)}" if dtype is not None else ""
    expected = f"a float array of shape {shape_text(shape)} ({layout}; any float dtype{converted_to})"
    if array.dtype.kind != "f" or not _shape_matches(array, shape):
        raise UsageError(f"{name} must be {expected}, got {describe(array)}")
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf: reported just below
        converted = np.ascontiguousarray(array.astype(dtype, copy=False))
    finite = np.isfinite(converted)
    if not finite.all():
        nan = int(np.isnan(converted).sum())
        message = (
            f"{name} holds {nan} NaN and {finite.size - int(finite.sum()) - nan} infinite values (as {dtype}): the "
            "export's kept tokens and outputs for it are meaningless; clean the input"
        )
        if strict:
            raise UsageError(message)
        warnings.warn(message + " (strict=True makes this an error)", NonFiniteInputWarning, stacklevel=stacklevel + 1)
    return converted


def check_ids(
    value: Any,
    name: str,
    shape: Shape,
    layout: str,
    vocab_size: int | None,
    vocab_source: str = "",
    allowed: Sequence[int] = (),
) -> np.ndarray:
    """Token ids of `shape` (axes described by `layout`) as int64, each in 0..vocab_size-1 or one of `allowed`
    (e.g. the image token id, replaced by image embeddings before the decoder sees it)."""
    array = to_numpy(value, name)
    if array.dtype.kind not in "iu" or not _shape_matches(array, shape):
        raise UsageError(
            f"{name} must be integer token ids of shape {shape_text(shape)} ({layout}), got {describe(array)}"
        )
    if vocab_size is not None and array.size:
        outside = (array < 0) | (array >= vocab_size)
        for token in allowed:
            outside &= array != token
        if outside.any():
            bad = array[outside]
            source = f", {vocab_source}" if vocab_source else ""
            raise UsageError(
                f"{name} holds {bad.size} ids outside 0..{vocab_size - 1} (e.g. {bad.flat[0]}); this export's "
                f"vocabulary has {vocab_size} tokens{source}: tokenize with the model's own tokenizer"
            )
    return np.ascontiguousarray(array.astype(np.int64, copy=False))


def resolve_strict(strict: bool | None, default: bool) -> bool:
    return default if strict is None else bool(strict)
