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
from tpc.exporter import ExportPart, get_target, runtime_for
from tpc.exporter.bundle import write_bundle
from tpc.outputs import absolute, check_output, commit, recover, staging_dir
from tpc.passes.policy_stages import StagePart, policy_stages, prefill_stage
from tpc.passes.policy_step import PolicyStep
from tpc.pipeline import Pruned, PruneRequest, as_arrays, build, eager_outputs
from tpc.progress import Step, silent
from tpc.runtimes import RUNTIMES
from tpc.runtimes.staged import STAGES_PROTOCOL
from tpc.verification import (
    VerifyReport,
    check_samples,
    skipped_verification,
    verify,
    write_episode_sample,
    write_generation_sample,
)


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


def staged_components(parts: dict[str, ExportPart]) -> dict[str, dict[str, StagePart]]:
    """The policy steps of an export, each split into its prefill and decode stages (targets that lower per stage)."""
    return {
        name: policy_stages(part.module, part.inputs)
        for name, part in parts.items()
        if isinstance(part.module, PolicyStep)
    }


def _program_parts(
    parts: dict[str, ExportPart], forced_parts: dict[str, ExportPart], staged: dict[str, dict[str, StagePart]]
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
            forced_programs[stage_method(name, PREFILL)] = prefill_stage(part.module, part.inputs, kept).part
    return programs, forced_programs


def _manifest(pruned: Pruned, target_name: str, components: list[ComponentSpec], versions: dict) -> Manifest:
    plan = pruned.plan
    geometry = pruned.source.geometry
    runtime = runtime_for(target_name)
    generation = plan.generation() if hasattr(plan, "generation") else None
    policy = plan.policy() if hasattr(plan, "policy") else None
    prompt = (generation or policy or {}).get("prompt")
    before = prompt["image_tokens"] if prompt else geometry.num_patches
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
        target=target_name,
        dtype=pruned.request.dtype,
        batch=pruned.request.batch,
        components=components,
        tokens={
            "before": before,
            "after": pruned.keep,
            "grid": list(geometry.grid),
            "prefix_tokens": geometry.prefix_tokens,
            "stage": pruned.method.stage,
        },
        generation=generation,
        policy=policy,
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
    from tpc.models_zoo import ZOO_PREFIX
    from tpc.models_zoo.zoo import cache_root

    if model.startswith(ZOO_PREFIX):
        return [("tpc's model cache", cache_root())]
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

    `target_options`: the target's own settings (Core ML's `compute_units`). `bundle`: ExecuTorch only, also
    write the phone benchmark bundle (`tpc.exporter.bundle`). Where the target's runtime cannot run on this
    machine (Core ML off macOS), the export keeps its conversion checks and records the skipped run.
    """
    output = absolute(output)
    check_samples(samples)
    exporter = get_target(target, **(target_options or {}))
    exporter.check_installed()
    if bundle and target != "executorch":
        raise UsageError(f"--bundle applies to --target executorch (an ExecuTorch benchmark bundle), not '{target}'")
    recover(output)  # first: a killed --force export's old output is put back before the existence check
    protected = protected_paths(request.model)
    check_output(output, force, protected, protected)
    what = "(the unpruned baseline)" if request.method == "none" else f"and insert the {request.method} prune point"
    with step(f"load {request.model} {what}"):
        pruned = build(request)
    staging = staging_dir(output)
    try:
        first_inputs = as_arrays(pruned.samples(seed=0))
        expected = {name: eager_outputs(c, first_inputs[name]) for name, c in pruned.components.items()}
        parts = {
            name: ExportPart(component.module, _tensors(first_inputs[name]), component.output_names)
            for name, component in pruned.components.items()
        }
        cuts = RUNTIMES[exporter.runtime].cuts_outputs
        forced_parts = {} if cuts else teacher_forced_parts(pruned, first_inputs, expected)
        staged = staged_components(parts) if exporter.lowers_policies_per_stage else {}
        programs, forced_programs = _program_parts(parts, forced_parts, staged)
        with step(f"export {', '.join(programs)} to {target}"):
            artifacts = exporter.export_components(programs, staging, staging)
        forced = {}
        if forced_programs:
            with step(f"export teacher-forced {', '.join(forced_programs)} (verification only)"):
                forced = exporter.export_components(forced_programs, staging / TEACHER_FORCED_DIR, staging)
        versions: dict[str, str] = {}

        def spec_for(name: str, inputs: dict, outputs: dict) -> ComponentSpec:
            artifact = artifacts[name]
            versions.update(artifact.graph.pop("versions", {}))
            write_samples(staging, name, inputs, outputs)
            return ComponentSpec(
                name,
                artifact.path,
                [TensorSpec.of(n, a) for n, a in inputs.items()],
                [TensorSpec.of(n, a) for n, a in outputs.items()],
                artifact.graph,
                method=artifact.method,
                teacher_forced=forced[name].path if name in forced else None,
            )

        specs = []
        for name in pruned.components:
            if name not in staged:
                specs.append(spec_for(name, first_inputs[name], expected[name]))
                continue
            stages = [
                spec_for(stage_method(name, stage), _arrays(part.part.inputs), _arrays(part.expected))
                for stage, part in staged[name].items()
            ]
            write_samples(staging, name, first_inputs[name], expected[name])
            step_spec = ComponentSpec(
                name,
                stages[0].artifact,
                [TensorSpec.of(n, a) for n, a in first_inputs[name].items()],
                [TensorSpec.of(n, a) for n, a in expected[name].items()],
                stages=stages,
            )
            specs.append(step_spec)
        manifest = _manifest(pruned, target, specs, versions)
        if staged:
            manifest.policy["stages"] = STAGES_PROTOCOL
        if manifest.generation is not None:
            write_generation_sample(staging, pruned)
        if manifest.policy is not None:
            write_episode_sample(staging, pruned)
        if bundle:
            with step("write the phone benchmark bundle"):
                write_bundle(staging, manifest)
        manifest.write(staging)  # records the sha256 of every file written so far
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
        commit(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(output, manifest, report, skipped)
