"""Comparisons every kind's verification shares: sample arrays against their declared layout, and where two
arrays first differ (for the one line a failed check prints)."""

from __future__ import annotations

import numpy as np


def array_problems(arrays: dict[str, np.ndarray], expected: dict[str, tuple[list[int], str]]) -> list[str]:
    problems = []
    if set(arrays) != set(expected):
        extra, lacking = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
        problems.append(
            f"arrays {sorted(arrays)}; tpc.json names {sorted(expected)} (extra {extra}, missing {lacking})"
        )
    for name in sorted(set(arrays) & set(expected)):
        shape, dtype = expected[name]
        array = arrays[name]
        if list(array.shape) != list(shape) or str(array.dtype) != dtype:
            problems.append(f"{name} is {array.dtype}{list(array.shape)}, tpc.json says {dtype}{list(shape)}")
    return problems


def first_difference(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {list(got.shape)} vs {list(want.shape)}"
    where = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f"first at {list(where)}: {got[where]} vs eager {want[where]}"
