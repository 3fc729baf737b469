"""`tpc export`: build the pruned model, export it for a target, write samples and manifest, verify, commit.

Nothing is left half-written: everything goes to a staging directory beside the output, which is renamed into
place only when the export (and, by default, its verification) succeeded. An existing output is replaced
only with `force`.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import tpc
from tpc.errors import UsageError
from tpc.exporter import get_target, runtime_for
from tpc.exporter.manifest import ComponentSpec, Manifest, TensorSpec, write_samples
from tpc.pipeline import Pruned, PruneRequest, as_arrays, build
from tpc.progress import Step, silent
from tpc.verification import (
    VerifyReport,
    eager_outputs,
    verify,
    write_episode_sample,
    write_generation_sample,
)


class VerificationFailed(Exception):
    """The export ran but does not match eager; carries the report."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(report.diagnosis)
        self.report = report


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    report: VerifyReport | None


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise UsageError(f"output '{output}' already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output '{output}' is a file, not a directory; remove it or choose another --output")


def _commit(staging: Path, output: Path) -> None:
    """Move the finished staging directory into place, replacing an old output only at the last moment."""
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(retired / output.name)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)


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
            "tpc": tpc.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **versions,
            **runtime.versions(),
        },
    )


def export(
    request: PruneRequest,
    target: str,
    output: Path,
    force: bool = False,
    run_verify: bool = True,
    samples: int = 4,
    step: Step = silent,
) -> ExportResult:
    """Export `request` for `target` into `output`; raises VerificationFailed if it does not match eager."""
    output = Path(output).expanduser().resolve()
    exporter = get_target(target)
    exporter.check_installed()
    _check_output(output, force)
    with step(f"load {request.model} and insert {request.method} prune point"):
        pruned = build(request)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tpc-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary directory
    try:
        first_inputs = as_arrays(pruned.samples(seed=0))
        specs, versions = [], {}
        for name, component in pruned.components.items():
            inputs = first_inputs[name]
            artifact = f"{name}{exporter.suffix}"
            with step(f"export {name} to {target}"):
                tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
                graph = exporter.export(component.module, tensors, component.output_names, staging / artifact)
            versions.update(graph.pop("versions", {}))
            expected = eager_outputs(component, inputs)
            write_samples(staging, name, inputs, expected)
            specs.append(
                ComponentSpec(
                    name,
                    artifact,
                    [TensorSpec.of(n, a) for n, a in inputs.items()],
                    [TensorSpec.of(n, a) for n, a in expected.items()],
                    graph,
                )
            )
        manifest = _manifest(pruned, target, specs, versions)
        if manifest.generation is not None:
            write_generation_sample(staging, pruned)
        if manifest.policy is not None:
            write_episode_sample(staging, pruned)
        manifest.write(staging)
        report = None
        if run_verify:
            report = verify(staging, samples=samples, pruned=pruned, step=step)
            manifest.verification = report.to_dict()
            manifest.write(staging)
            if not report.passed:
                raise VerificationFailed(report)
        _commit(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(output, manifest, report)
