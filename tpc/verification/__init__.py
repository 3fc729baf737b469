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
kept_indices must be equal, always. A `Diff` reports the worst margin against that rule,
max over elements of |exported - eager| / (atol + rtol * |eager|): it passes iff the margin is <= 1.

Before anything runs, `verify` checks the export's own files (`check_shipped`, below): every file matches the
sha256 recorded in tpc.json at export, tpc.json's inputs/outputs equal each artifact's own (ONNX graph I/O, the
ExecuTorch method meta, the Core ML model description), and the samples have the manifest's names, shapes and
dtypes (kept indices ascending and in range). Then it checks that the samples are what eager PyTorch produces:
`expected.npz` for `inputs.npz` within the tolerance (kept indices exactly), `generation.npz`'s tokens and
`episode.npz`'s steps by replaying eager on their stored inputs. Any difference FAILs the verification (exit 1)
and names what differs; a missing or unreadable file is a UsageError (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from tpc.contract.manifest import INPUTS_FILE, Manifest
from tpc.contract.names import KEPT_INDICES, SINGLE
from tpc.contract.report import TOLERANCES, Diff, Tolerance, VerifyReport, skipped_verification
from tpc.errors import RuntimeUnavailable, UsageError
from tpc.kinds.base import Pruned, PruneRequest, Sessions, as_arrays, eager_outputs, kind_of
from tpc.kinds.vlm import generation_inputs
from tpc.pipeline import build
from tpc.progress import Step, silent
from tpc.runtimes.base import Runtime, open_component, runtime_of
from tpc.verification.checks import check_component, check_samples_against_eager
from tpc.verification.inputs import load_user_inputs
from tpc.verification.shipped import check_shipped, kept_problems, sample_file


def request_from_manifest(manifest: Manifest) -> PruneRequest:
    model = manifest.model["ref"] if manifest.model["ref"].startswith("zoo:") else manifest.model["path"]
    params = {k: str(v) for k, v in manifest.params.items() if v is not None}  # None: the default, derived again
    options = kind_of(manifest).request_options(manifest)
    return PruneRequest(model, manifest.method, manifest.keep, params, manifest.dtype, manifest.batch, **options)


def _diagnose(report: VerifyReport) -> str:
    failed = [check for check in report.shipped if not check.passed]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more checks)" if len(failed) > 1 else ""
        return f"the export's own files do not match what it records or claims: {first.check}: {first.detail}{more}"
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
    if report.episode is not None and not report.episode.passed:
        where = report.episode.first_difference
        if where is None:
            return "the carried history drifts beyond tolerance over the episode (kept tokens and actions agree)"
        return (
            f"the exported policy's episode differs from eager at episode {where[0]}, step {where[1]} although every "
            "graph matches on its samples: a selection or argmax near-tie, carried on by the state"
        )
    if (
        report.generation is not None
        and report.generation.rows_equal == report.generation.rows
        and (report.generation.seg_hidden is not None and not report.generation.seg_hidden.passed)
    ):
        return "the final hidden state at [SEG] (seg_hidden, what a mask decoder reads) drifts beyond tolerance"
    if report.generation is not None and not report.generation.passed:
        sample, row, position = report.generation.first_difference or [0, 0, 0]
        return (
            f"greedy generation differs from eager (sample {sample}, row {row}, from token {position}) although every "
            "component matches within tolerance: an argmax near-tie"
        )
    return "exported outputs match eager"


DEFAULT_SAMPLES = 4


MAX_SAMPLES = 64  # a documented cap: seeded inputs beyond it add time, not confidence


def check_samples(samples: int) -> None:
    if not 1 <= samples <= MAX_SAMPLES:
        raise UsageError(f"--samples {samples} is outside 1..{MAX_SAMPLES} (seeded inputs the verification compares)")


def verify(
    directory: Path,
    samples: int | None = None,
    inputs_file: Path | None = None,
    pruned: Pruned | None = None,
    step: Step = silent,
) -> VerifyReport:
    """Check the export's own files, then run it in its runtime against the eager pruned model (module docstring).

    `samples`: seeded inputs compared (default 4, the first being the shipped `samples/.../inputs.npz`);
    `inputs_file`: the user's own inputs instead (then `samples` must not be given)."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    if samples is not None and inputs_file is not None:
        raise UsageError(
            "--samples and --inputs exclude each other: --inputs verifies the one input in your file (and the "
            "export's own samples); drop --samples, or drop --inputs to verify on seeded samples"
        )
    samples = DEFAULT_SAMPLES if samples is None else samples
    check_samples(samples)
    runtime = runtime_of(manifest)
    tolerance = TOLERANCES[manifest.dtype]
    report = VerifyReport(True, runtime.name, 0, tolerance.atol, tolerance.rtol, tolerance.atol_scaled_by_max, 0, 0)
    kind = kind_of(manifest)
    entry = load_user_inputs(Path(inputs_file), kind.entry_specs(manifest)) if inputs_file is not None else None
    with step("check the export's own files: hashes, I/O against the artifacts, samples"):
        shipped = check_shipped(directory, manifest, runtime.name)
    report.shipped = shipped.checks
    if not shipped.passed:
        return _finish(report)  # nothing runs files that are not what the export wrote
    sessions: Sessions | None = None
    unavailable = None
    try:  # opened before the model: a corrupt artifact or a missing runtime says so before any weights load
        sessions = open_sessions(runtime, directory, manifest)
    except RuntimeUnavailable as error:
        unavailable = error
    if pruned is None:
        with step("load eager model"):
            pruned = build(request_from_manifest(manifest))
    with step("compare the shipped samples with eager"):
        check_samples_against_eager(report, pruned, manifest, shipped, directory, tolerance)
    if not all(check.passed for check in report.shipped):
        return _finish(report)  # forged samples: the runtime run would start from them
    if sessions is None:
        ran = [check.check for check in report.shipped]
        skipped = RuntimeUnavailable(
            f"{unavailable}. Checked here and passed: {len(ran)} checks of the export's own files (hashes, tpc.json "
            f"against the artifacts, samples against eager); not run: the artifacts in {runtime.name}"
        )
        skipped.reason, skipped.ran = str(unavailable), ran  # type: ignore[attr-defined]
        raise skipped from None
    seeds = [manifest.sample_seed + i for i in range(samples)]
    if entry is not None:
        sample_inputs = [kind.entry_samples(pruned, entry)]
    else:
        first = {c.name: shipped.samples[sample_file(directory, c.name, INPUTS_FILE)] for c in manifest.components}
        sample_inputs = [first] + [as_arrays(pruned.samples(seed)) for seed in seeds[1:]]
    report.samples = len(sample_inputs)
    with step(f"verify {len(sample_inputs)} samples in {runtime.name}"):
        for inputs in sample_inputs:
            for name, component in pruned.components.items():
                label = "" if name == SINGLE else f"{name}."
                check_component(report, component, label, sessions[name], inputs[name], tolerance)
    kind.verify_runs(pruned, manifest, sessions, seeds, tolerance, report, step)
    return _finish(report)


def open_sessions(runtime: type[Runtime], directory: Path, manifest: Manifest) -> Sessions:
    """Each component in `runtime`, and teacher-forced where it selects tokens."""
    sessions: Sessions = {}
    for spec in manifest.components:
        selects = any(o.name == KEPT_INDICES for o in spec.outputs)
        forced = open_component(runtime, directory, spec, teacher_forced=True) if selects else None
        sessions[spec.name] = (open_component(runtime, directory, spec), forced)
    return sessions


def _finish(report: VerifyReport) -> VerifyReport:
    report.passed = (
        all(check.passed for check in report.shipped)
        and report.kept_rows_agreeing == report.kept_rows
        and all(d.passed for d in report.outputs.values())
        and all(d.passed for d in report.teacher_forced.values())
        and (report.generation is None or report.generation.passed)
        and (report.episode is None or report.episode.passed)
    )
    report.diagnosis = _diagnose(report)
    return report


__all__ = [
    "TOLERANCES",
    "Diff",
    "Tolerance",
    "VerifyReport",
    "check_samples",
    "check_shipped",
    "eager_outputs",
    "generation_inputs",
    "kept_problems",
    "skipped_verification",
    "verify",
]
