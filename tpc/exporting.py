"""`tpc export`: build the pruned model, export it for a target, write samples and manifest, verify, commit.

Nothing is left half-written: everything goes to a staging directory beside the output, which is renamed into
place only when the export (and, by default, its verification) succeeded (`tpc.outputs` keeps that step atomic
and refuses outputs that must never be replaced).
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from tpc.contract.manifest import ComponentSpec, Manifest, TensorSpec, write_samples
from tpc.contract.names import KEPT_INDICES, PREFILL, stage_method
from tpc.errors import RuntimeUnavailable, UsageError, VerificationFailed
from tpc.exporter import ExportPart, get_target
from tpc.exporter.base import Artifact, Target
from tpc.kinds.base import Kind
from tpc.models_zoo import ZOO_PREFIX
from tpc.models_zoo.zoo import CHECKPOINTS, cache_root
from tpc.outputs import absolute, check_output, commit, recover, staging_dir
from tpc.passes.policy_stages import StagePart
from tpc.pipeline import Pruned, PruneRequest, as_arrays, build, eager_outputs, kind_for
from tpc.progress import Step, silent
from tpc.runtimes import RUNTIMES
from tpc.verification import VerifyReport, check_samples, skipped_verification, verify


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    report: VerifyReport | None
    skipped: str | None = None  # why the runtime check could not run here (its checks at export time still ran)


TEACHER_FORCED_DIR = "teacher_forced"


class TeacherForced(nn.Module):
    """A component whose selection is replaced by a `kept_indices` input (its last), for targets that cannot
    cut a compiled graph: verification feeds it the eager indices to tell a selection flip from drift."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *inputs, kept_indices = args
        return self.module(*inputs, forced_indices=kept_indices)


def teacher_forced_parts(pruned: Pruned, inputs: dict[str, dict], expected: dict[str, dict]) -> dict[str, ExportPart]:
    """The components that select tokens, as teacher-forced graphs fed the eager kept indices."""
    return {
        name: ExportPart(
            TeacherForced(component.module),
            _tensors({**inputs[name], KEPT_INDICES: expected[name][KEPT_INDICES]}),
            component.output_names,
        )
        for name, component in pruned.components.items()
        if KEPT_INDICES in component.output_names
    }


def _tensors(arrays: dict) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def _arrays(tensors: dict) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tensors.items()}


def _program_parts(
    kind: Kind,
    parts: dict[str, ExportPart],
    forced_parts: dict[str, ExportPart],
    staged: dict[str, dict[str, StagePart]],
) -> tuple[dict[str, ExportPart], dict[str, ExportPart]]:
    """What the target writes: each component, or a staged one's stages by method name; the same for the
    teacher-forced programs, where a staged step's prefill is the stage that selects."""
    programs, forced_programs = {}, {}
    for name, part in parts.items():
        if name not in staged:
            programs[name] = part
            if name in forced_parts:
                forced_programs[name] = forced_parts[name]
            continue
        for stage, stage_part in staged[name].items():
            programs[stage_method(name, stage)] = stage_part.part
        if name in forced_parts:
            kept = forced_parts[name].inputs[KEPT_INDICES]
            forced_programs[stage_method(name, PREFILL)] = kind.forced_first_stage(part, kept).part
    return programs, forced_programs


def _manifest(job: _Job, components: list[ComponentSpec], versions: dict[str, str]) -> Manifest:
    pruned, kind, plan = job.pruned, job.kind, job.pruned.plan
    geometry = pruned.source.geometry
    runtime = RUNTIMES[job.exporter.runtime]
    runs = plan.kept_widths
    return Manifest(
        model={
            "ref": pruned.source.ref,
            "path": str(pruned.source.path),
            "family": pruned.source.adapter.family,
            "model_type": pruned.source.config.model_type,
        },
        method=pruned.method.name,
        keep=pruned.keep,
        params=pruned.params,
        target=job.exporter.name,
        dtype=pruned.request.dtype,
        batch=pruned.request.batch,
        components=components,
        tokens={
            "before": kind.tokens_before(plan),
            "after": pruned.keep,
            "grid": list(geometry.grid),
            "prefix_tokens": geometry.prefix_tokens,
            "stage": pruned.method.stage,
            **({"kept_runs": list(runs)} if len(runs) > 1 else {}),
        },
        **kind.manifest_sections(plan),
        runtime=runtime.name,
        cost=kind.stage_costs(plan),  # for `tpc profile`'s ideal speedups, which may run without torch
        versions={
            "tpc": version("tpc"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **versions,
            **runtime.versions(),
        },
    )


def protected_paths(model: str) -> list[tuple[str, Path]]:
    """Directories an export may never replace besides the working and home directories: the model's own."""
    if model.startswith(ZOO_PREFIX):
        return [("tpc's model cache", cache_root()), ("tpc's trained checkpoints", CHECKPOINTS)]
    return [("the model directory", absolute(model))]


def export(
    request: PruneRequest,
    target: str,
    output: Path,
    force: bool = False,
    run_verify: bool = True,
    samples: int = 4,
    step: Step = silent,
    target_options: dict[str, Any] | None = None,
    bundle: bool = False,
) -> ExportResult:
    """Export `request` for `target` into `output`; raises VerificationFailed if it does not match eager.

    `target_options`: the target's own settings (Core ML's `compute_units`). `bundle`: also write the target's
    phone benchmark bundle (`Target.bundle`; ExecuTorch's is `tpc.exporter.executorch.bundle`). Where the target's
    runtime cannot run on this machine (Core ML off macOS), the export keeps its conversion checks and records the
    skipped run.
    """
    output = absolute(output)
    check_samples(samples)
    exporter = get_target(target, **(target_options or {}))
    exporter.check_installed()
    if bundle and exporter.bundle is None:
        raise UsageError(f"--bundle applies to --target executorch (an ExecuTorch benchmark bundle), not '{target}'")
    recover(output)  # first: a killed --force export's old output is put back before the existence check
    protected = protected_paths(request.model)
    check_output(output, force, protected, protected)
    what = "(the unpruned baseline)" if request.method == "none" else f"and insert the {request.method} prune point"
    with step(f"load {request.model} {what}"):
        pruned = build(request)  # plan (every check before any weights load) -> build
    staging = staging_dir(output)
    try:
        first_inputs = as_arrays(pruned.samples(seed=0))
        expected = {name: eager_outputs(c, first_inputs[name]) for name, c in pruned.components.items()}
        job = _Job(pruned, kind_for(pruned.source), exporter, first_inputs, expected, staging, step)
        manifest = _write(job, _lower(job), bundle)
        report, skipped = _verify(manifest, pruned, staging, run_verify, samples, step)
        commit(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(output, manifest, report, skipped)


@dataclass
class _Job:
    """One export under way: the built model, its kind, the target, the first sample's eager inputs and outputs
    per component, and the staging directory it is written into."""

    pruned: Pruned
    kind: Kind
    exporter: Target
    inputs: dict[str, dict[str, np.ndarray]]
    expected: dict[str, dict[str, np.ndarray]]
    staging: Path
    step: Step


@dataclass
class Lowered:
    """What the target wrote: each program's artifact, the teacher-forced ones, and which components were staged."""

    artifacts: dict[str, Artifact]
    forced: dict[str, Artifact]
    staged: dict[str, dict[str, StagePart]]


def _lower(job: _Job) -> Lowered:
    """Each component (or its stages, for targets that lower a policy step per stage) through the target; the
    selecting ones also teacher-forced, where the runtime cannot cut a compiled graph at kept_indices."""
    pruned, kind, exporter, staging, step = job.pruned, job.kind, job.exporter, job.staging, job.step
    parts = {
        name: ExportPart(component.module, _tensors(job.inputs[name]), component.output_names)
        for name, component in pruned.components.items()
    }
    cuts = RUNTIMES[exporter.runtime].cuts_outputs
    forced_parts = {} if cuts else teacher_forced_parts(pruned, job.inputs, job.expected)
    staged = kind.stages(parts) if exporter.lowers_policies_per_stage else {}
    programs, forced_programs = _program_parts(kind, parts, forced_parts, staged)
    with step(f"export {', '.join(programs)} to {exporter.name}"):
        artifacts = exporter.export_components(programs, staging, staging)
    forced = {}
    if forced_programs:
        with step(f"export teacher-forced {', '.join(forced_programs)} (verification only)"):
            forced = exporter.export_components(forced_programs, staging / TEACHER_FORCED_DIR, staging)
    return Lowered(artifacts, forced, staged)


def _write(job: _Job, lowered: Lowered, bundle: bool) -> Manifest:
    """Samples (each program's, then the kind's own), the manifest with every file's hash, the optional bundle."""
    staging, exporter = job.staging, job.exporter
    versions: dict[str, str] = {}

    def tensors(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
        return [TensorSpec.of(n, a) for n, a in arrays.items()]

    def spec_for(name: str, inputs: dict, outputs: dict) -> ComponentSpec:
        artifact = lowered.artifacts[name]
        versions.update(artifact.graph.pop("versions", {}))
        write_samples(staging, name, inputs, outputs)
        return ComponentSpec(
            name,
            artifact.path,
            tensors(inputs),
            tensors(outputs),
            artifact.graph,
            method=artifact.method,
            teacher_forced=lowered.forced[name].path if name in lowered.forced else None,
        )

    specs = []
    for name in job.pruned.components:
        inputs, expected = job.inputs[name], job.expected[name]
        if name not in lowered.staged:
            specs.append(spec_for(name, inputs, expected))
            continue
        stages = [
            spec_for(stage_method(name, stage), _arrays(part.part.inputs), _arrays(part.expected))
            for stage, part in lowered.staged[name].items()
        ]
        write_samples(staging, name, inputs, expected)
        specs.append(ComponentSpec(name, stages[0].artifact, tensors(inputs), tensors(expected), stages=stages))
    manifest = _manifest(job, specs, versions)
    if lowered.staged:
        job.kind.record_stages(manifest)
    job.kind.write_samples(staging, job.pruned)
    if bundle:
        with job.step(f"write {exporter.bundle}"):
            exporter.write_bundle(staging, manifest)
    manifest.write(staging)  # records the sha256 of every file written so far
    return manifest


def _verify(
    manifest: Manifest, pruned: Pruned, staging: Path, run_verify: bool, samples: int, step: Step
) -> tuple[VerifyReport | None, str | None]:
    """Verify the staged export (unless told not to); its result goes into tpc.json; drift raises."""
    report, skipped = None, None
    if run_verify:
        try:
            report = verify(staging, samples=samples, pruned=pruned, step=step)
        except RuntimeUnavailable as unavailable:
            skipped = str(unavailable)
            manifest.verification = skipped_verification(skipped)
        else:
            manifest.verification = report.to_dict()
        manifest.write(staging)
        if report is not None and not report.passed:
            raise VerificationFailed(report)
    return report, skipped
