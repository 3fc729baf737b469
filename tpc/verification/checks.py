"""Eager against exported, one component and one sample at a time, and the shipped samples against eager.

A component that selects tokens is also run teacher-forced (fed the eager kept indices), which tells a *selection
flip* (the computation downstream matches) from *drift*."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tpc.contract.manifest import EXPECTED_FILE, INPUTS_FILE, Manifest
from tpc.contract.names import KEPT_INDICES, Session
from tpc.contract.report import Diff, ShippedCheck, Tolerance, VerifyReport
from tpc.kinds.base import Component, Pruned, eager_outputs, kind_of
from tpc.kinds.checks import first_difference
from tpc.verification.shipped import Shipped, sample_file


def check_component(
    report: VerifyReport,
    component: Component,
    label: str,
    sessions: tuple[Session, Session | None],
    inputs: dict[str, np.ndarray],
    tolerance: Tolerance,
) -> None:
    """Compare one component on one sample; teacher-force it when it selects tokens."""
    exported, forced = sessions
    want = eager_outputs(component, inputs)
    got = exported.run(inputs)
    rows_equal = np.ones(1, dtype=bool)
    if KEPT_INDICES in want:
        if np.shape(got[KEPT_INDICES]) == np.shape(want[KEPT_INDICES]):
            rows_equal = np.all(got[KEPT_INDICES] == want[KEPT_INDICES], axis=-1)
        else:
            rows_equal = np.zeros(want[KEPT_INDICES].shape[:-1], dtype=bool)
        report.kept_rows += rows_equal.size
        report.kept_rows_agreeing += int(rows_equal.sum())
        counts = report.kept.setdefault(f"{label}{KEPT_INDICES}", [0, 0])
        counts[0] += int(rows_equal.sum())
        counts[1] += rows_equal.size
    teacher = forced.run({**inputs, KEPT_INDICES: want[KEPT_INDICES]}) if forced is not None else None
    for name in component.output_names:
        if name == KEPT_INDICES:
            continue
        key = f"{label}{name}"
        if teacher is not None:
            report.teacher_forced[key] = Diff.of(teacher[name], want[name], tolerance).worst(
                report.teacher_forced.get(key)
            )
        if rows_equal.all():
            report.outputs[key] = Diff.of(got[name], want[name], tolerance).worst(report.outputs.get(key))


def check_samples_against_eager(
    report: VerifyReport,
    pruned: Pruned,
    manifest: Manifest,
    shipped: Shipped,
    directory: Path,
    tolerance: Tolerance,
) -> None:
    """The shipped samples are what eager PyTorch produces for their stored inputs: `expected.npz` per component
    (kept indices exactly, the rest within the tolerance), the generation's tokens, the episode's every step."""
    for name, component in pruned.components.items():
        inputs_file = sample_file(directory, name, INPUTS_FILE)
        expected_file = sample_file(directory, name, EXPECTED_FILE)
        if inputs_file not in shipped.samples:
            continue
        problems = []
        try:
            want = eager_outputs(component, shipped.samples[inputs_file])
        except Exception as err:  # a forged input eager cannot run (token ids out of range, ...)
            want, problems = {}, [f"eager PyTorch cannot run {inputs_file} ({type(err).__name__}: {err})"[:200]]
        stored = shipped.samples[expected_file]
        for output, array in want.items():
            if output == KEPT_INDICES:
                if not np.array_equal(stored[output], array):
                    problems.append(f"{output} differ from eager's ({first_difference(stored[output], array)})")
                continue
            diff = Diff.of(stored[output], array, tolerance)
            if not diff.passed:
                problems.append(f"{output}: margin {diff.margin:.3g} > 1 (max abs {diff.max_abs:.3g})")
        report.shipped.append(
            ShippedCheck(f"{expected_file} = eager on {inputs_file}", not problems, "; ".join(problems[:4]))
        )
    report.shipped += kind_of(manifest).check_samples(pruned, manifest, shipped.samples, tolerance)
