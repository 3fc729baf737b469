"""A user's own inputs for `tpc verify --inputs`: one .npz of the export's entry inputs, checked against the
static shapes and dtypes before anything runs (never unpickled)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpc.contract.manifest import TensorSpec, load_npz
from tpc.errors import UsageError


def load_user_inputs(path: Path, expected: dict[str, TensorSpec]) -> dict[str, np.ndarray]:
    arrays = load_npz(path, f"inputs file '{path}' does not exist", f"inputs file '{path}'")
    sample = {}
    for name, spec in expected.items():
        if name not in arrays:
            raise UsageError(f"inputs file '{path}' has no array '{name}' (it has: {', '.join(arrays) or 'none'})")
        array = arrays[name]
        if list(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            raise UsageError(
                f"'{name}' in '{path}' is {array.dtype}{list(array.shape)}; the export takes "
                f"{spec.dtype}{spec.shape} (static shapes)"
            )
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            what = "NaN" if np.isnan(array).any() else "infinity"
            raise UsageError(
                f"inputs contain {what}: '{name}' in '{path}' is not finite; verification compares finite inputs "
                "(replace the non-finite values)"
            )
        sample[name] = array
    return sample
