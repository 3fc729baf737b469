"""Verification: does the exported artifact, run in its real runtime, compute what eager PyTorch computes?

For each sample input it compares every output (max abs / rel diff against documented tolerances), checks that
the kept indices agree exactly, and runs the artifact teacher-forced (fed the eager kept indices). The last
check tells the two failure kinds apart: a *selection flip* (scores a rounding error apart at the K-th
boundary; the computation downstream matches) and *drift* (the exported computation itself differs).

Default tolerances (elementwise |exported - eager| <= atol + rtol * |eager|):
    fp32: atol 1e-4, rtol 1e-3
    fp16: atol 4e-3 * max|eager output| (about 4 fp16 ulps at the output's scale), rtol 1e-2
An fp16 export and its fp16 eager model round intermediates at different points, so their outputs differ by a
few ulps of the output's magnitude; an absolute fp16 tolerance would fail on any tensor with values above ~10.
kept_indices must be equal, always.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpc.errors import UsageError
from tpc.exporter import runtime_for
from tpc.exporter.manifest import INPUTS_FILE, Manifest, read_samples
from tpc.pipeline import Pruned, PruneRequest, build
from tpc.progress import Step, silent


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_scaled_by_max: bool = False  # atol multiplies max|eager output|


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(4e-3, 1e-2, atol_scaled_by_max=True)}
INDEX_OUTPUT = "kept_indices"


@dataclass
class Diff:
    max_abs: float
    max_rel: float
    passed: bool

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> Diff:
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        error = np.abs(got64 - want64)
        atol = tolerance.atol * (float(np.abs(want64).max(initial=1.0)) if tolerance.atol_scaled_by_max else 1.0)
        return cls(
            max_abs=float(error.max(initial=0.0)),
            max_rel=float((error / np.maximum(np.abs(want64), 1e-12)).max(initial=0.0)),
            passed=bool(np.all(error <= atol + tolerance.rtol * np.abs(want64))),
        )

    def worst(self, other: Diff | None) -> Diff:
        if other is None:
            return self
        return Diff(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel), self.passed and other.passed)


@dataclass
class VerifyReport:
    passed: bool
    runtime: str
    samples: int
    atol: float
    rtol: float
    atol_scaled_by_max: bool
    kept_rows_agreeing: int
    kept_rows: int
    outputs: dict[str, Diff] = field(default_factory=dict)  # over samples whose selection agreed
    teacher_forced: dict[str, Diff] = field(default_factory=dict)
    diagnosis: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_from_manifest(manifest: Manifest) -> PruneRequest:
    model = manifest.model["ref"] if manifest.model["ref"].startswith("zoo:") else manifest.model["path"]
    params = {k: str(v) for k, v in manifest.params.items()}
    return PruneRequest(model, manifest.method, manifest.keep, params, manifest.dtype, manifest.batch)


def eager_outputs(pruned: Pruned, inputs: dict[str, np.ndarray], forced: np.ndarray | None = None) -> dict:
    with torch.no_grad():
        tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
        if forced is not None:
            tensors["forced_indices"] = torch.from_numpy(forced)
        outputs = pruned.module(**tensors)
    return {name: out.numpy() for name, out in zip(pruned.output_names, outputs, strict=True)}


def _load_user_inputs(path: Path, manifest: Manifest) -> list[dict[str, np.ndarray]]:
    if not path.exists():
        raise UsageError(f"inputs file '{path}' does not exist")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    sample = {}
    for spec in manifest.inputs:
        if spec.name not in arrays:
            raise UsageError(f"inputs file '{path}' has no array '{spec.name}' (it has: {', '.join(arrays) or 'none'})")
        array = arrays[spec.name]
        if list(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            raise UsageError(
                f"'{spec.name}' in '{path}' is {array.dtype}{list(array.shape)}; the export takes "
                f"{spec.dtype}{spec.shape} (static shapes)"
            )
        sample[spec.name] = array
    return [sample]


def _diagnose(report: VerifyReport) -> str:
    forced_ok = all(d.passed for d in report.teacher_forced.values())
    outputs_ok = all(d.passed for d in report.outputs.values())
    if report.kept_rows_agreeing < report.kept_rows:
        if forced_ok:
            return (
                "selection flip: the exported scores rank tokens differently from eager near the K-th boundary "
                "(teacher-forced parity passes, so the computation itself matches)"
            )
        return "the exported computation differs from eager (kept indices and teacher-forced outputs both disagree)"
    if not outputs_ok:
        return "numerical drift beyond tolerance with identical kept indices"
    return "exported outputs match eager"


def verify(
    directory: Path,
    samples: int = 4,
    inputs_file: Path | None = None,
    pruned: Pruned | None = None,
    step: Step = silent,
) -> VerifyReport:
    """Run the export in its runtime against the eager pruned model; see the module docstring."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    runtime = runtime_for(manifest.target)
    if pruned is None:
        with step("load eager model"):
            pruned = build(request_from_manifest(manifest))
    exported = runtime.load(directory / manifest.artifact)
    forced = runtime.load(directory / manifest.artifact, forced=(INDEX_OUTPUT,))
    if inputs_file is not None:
        sample_inputs = _load_user_inputs(Path(inputs_file), manifest)
    else:
        sample_inputs = [read_samples(directory, INPUTS_FILE)]
        for i in range(1, samples):
            seeded = pruned.example_inputs(seed=manifest.sample_seed + i)
            sample_inputs.append({name: t.numpy() for name, t in seeded.items()})

    tolerance = TOLERANCES[manifest.dtype]
    report = VerifyReport(
        True, runtime.name, len(sample_inputs), tolerance.atol, tolerance.rtol, tolerance.atol_scaled_by_max, 0, 0
    )
    with step(f"verify {len(sample_inputs)} samples in {runtime.name}"):
        for inputs in sample_inputs:
            want = eager_outputs(pruned, inputs)
            got = exported.run(inputs)
            rows_equal = np.all(got[INDEX_OUTPUT] == want[INDEX_OUTPUT], axis=-1)
            report.kept_rows += rows_equal.size
            report.kept_rows_agreeing += int(rows_equal.sum())
            teacher = forced.run({**inputs, INDEX_OUTPUT: want[INDEX_OUTPUT]})
            for name in pruned.output_names:
                if name == INDEX_OUTPUT:
                    continue
                forced_diff = Diff.of(teacher[name], want[name], tolerance)
                report.teacher_forced[name] = forced_diff.worst(report.teacher_forced.get(name))
                if rows_equal.all():
                    report.outputs[name] = Diff.of(got[name], want[name], tolerance).worst(report.outputs.get(name))
    report.passed = (
        report.kept_rows_agreeing == report.kept_rows
        and all(d.passed for d in report.outputs.values())
        and all(d.passed for d in report.teacher_forced.values())
    )
    report.diagnosis = _diagnose(report)
    return report
