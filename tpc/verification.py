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

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpc.errors import UsageError
from tpc.exporter import runtime_for
from tpc.exporter.manifest import (
    EPISODE_FILE,
    GENERATION_FILE,
    INPUTS_FILE,
    SAMPLES_DIR,
    Manifest,
    TensorSpec,
    read_samples,
)
from tpc.pipeline import SINGLE, Component, Pruned, PruneRequest, as_arrays, build, seeded_pixels
from tpc.progress import Step, silent
from tpc.runtimes.base import KEPT_INDICES, Session, open_component
from tpc.runtimes.generation import GenerationLoop, prefill_ids


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_scaled_by_max: bool = False  # atol multiplies max|eager output|


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(4e-3, 1e-2, atol_scaled_by_max=True)}


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
class GenerationCheck:
    """End-to-end greedy generation: exported components vs eager components, token for token."""

    samples: int
    new_tokens: int
    rows_equal: int
    rows: int
    first_difference: list[int] | None = None  # [sample, row, position] of the first differing token

    @property
    def passed(self) -> bool:
        return self.rows_equal == self.rows


@dataclass
class EpisodeCheck:
    """A seeded control episode, exported policy vs eager policy, each carrying its own state step to step."""

    episodes: int
    steps: int  # per episode
    steps_agreeing: int  # same kept indices and the same action tokens
    total_steps: int
    history: Diff | None = None  # the carried history after each step
    first_difference: list[int] | None = None  # [episode, step] of the first disagreeing step

    @property
    def passed(self) -> bool:
        return self.steps_agreeing == self.total_steps and (self.history is None or self.history.passed)


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
    generation: GenerationCheck | None = None
    episode: EpisodeCheck | None = None
    diagnosis: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("generation", "episode"):
            if getattr(self, name) is not None:
                data[name]["passed"] = getattr(self, name).passed
        return data


def skipped_verification(reason: str) -> dict[str, Any]:
    """What tpc.json and `verify --json` record when the runtime cannot run on this machine."""
    return {"passed": None, "skipped": reason}


def request_from_manifest(manifest: Manifest) -> PruneRequest:
    model = manifest.model["ref"] if manifest.model["ref"].startswith("zoo:") else manifest.model["path"]
    params = {k: str(v) for k, v in manifest.params.items()}
    generation = manifest.generation
    prompt = (generation or manifest.policy or {}).get("prompt")
    prompt_len = prompt["text_tokens"] if prompt else None
    max_new = generation["max_new_tokens"] if generation else None
    return PruneRequest(
        model, manifest.method, manifest.keep, params, manifest.dtype, manifest.batch, prompt_len, max_new
    )


def eager_outputs(component: Component, inputs: dict[str, np.ndarray], forced: np.ndarray | None = None) -> dict:
    with torch.no_grad():
        tensors = [torch.from_numpy(inputs[name]) for name in component.input_names]
        extra = {"forced_indices": torch.from_numpy(forced)} if forced is not None else {}
        outputs = component.module(*tensors, **extra)
    return {name: out.numpy() for name, out in zip(component.output_names, outputs, strict=True)}


def eager_loop(pruned: Pruned) -> GenerationLoop:
    """The generation loop over the eager components: what an exported VLM must reproduce."""
    runs = {name: functools.partial(eager_outputs, component) for name, component in pruned.components.items()}
    return GenerationLoop(runs, pruned.plan.generation())


def generation_inputs(pruned: Pruned, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from tpc.vlm import seeded_prompt

    return seeded_pixels(pruned.source, pruned.request, seed).numpy(), seeded_prompt(pruned.plan, seed)


def write_generation_sample(directory: Path, pruned: Pruned) -> None:
    pixels, ids = generation_inputs(pruned, seed=0)
    tokens = eager_loop(pruned).generate(pixels, ids, stop_at_eos=False)
    np.savez(directory / SAMPLES_DIR / GENERATION_FILE, pixel_values=pixels, input_ids=ids, tokens=tokens)


EPISODE_STEPS = 8


def episode_steps(pruned: Pruned) -> int:
    """Steps a verified episode runs: at least 8, and at least 5 pruned steps after the warm-up."""
    return max(EPISODE_STEPS, pruned.plan.method_params.get("window", 0) + 5)


def policy_episode(pruned: Pruned, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    from tpc.vla import seeded_frames, seeded_prompt

    return seeded_frames(pruned.plan, seed, episode_steps(pruned)), seeded_prompt(pruned.plan, seed)


def write_episode_sample(directory: Path, pruned: Pruned) -> None:
    """The eager policy's seeded episode, step by step: what a device without PyTorch replays and compares."""
    from tpc.vla import eager_policy

    frames, ids = policy_episode(pruned, seed=0)
    runner = eager_policy(pruned.plan, pruned.components)
    results = [runner.step_result(frame, ids) for frame in frames]
    num_image = pruned.plan.prompt.image_tokens
    kept_mask = np.zeros((len(results), num_image), dtype=bool)
    for step, result in enumerate(results):
        kept_mask[step, result.kept_indices] = True
    arrays = {
        "images": np.stack(frames),
        "input_ids": ids,
        "action_tokens": np.stack([r.tokens for r in results]),
        "actions": np.stack([r.action for r in results]),
        "kept_mask": kept_mask,
        "graph": np.array([r.graph for r in results]),
    }
    if runner.stateful:
        arrays["history"] = np.stack([r.history for r in results])
    np.savez(directory / SAMPLES_DIR / EPISODE_FILE, **arrays)


def _load_user_inputs(path: Path, expected: dict[str, TensorSpec]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UsageError(f"inputs file '{path}' does not exist")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
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
        sample[name] = array
    return sample


def _entry_specs(manifest: Manifest) -> dict[str, TensorSpec]:
    """What a user's --inputs file holds: the encoder's inputs, or a VLM's pixel_values and prompt input_ids."""
    if manifest.policy is not None:
        raise UsageError("--inputs applies to encoder and VLM exports; a policy is verified on seeded episodes")
    if manifest.generation is None:
        return {spec.name: spec for spec in manifest.components[0].inputs}
    pixels = next(s for s in manifest.component("vision").inputs if s.name == "pixel_values")
    prompt = TensorSpec("input_ids", [manifest.batch, manifest.generation["prompt"]["length"]], "int64")
    return {"pixel_values": pixels, "input_ids": prompt}


def _sample_inputs(pruned: Pruned, entry: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    if SINGLE in pruned.components:
        return {SINGLE: entry}
    from tpc.vlm import chained_samples

    ids = prefill_ids(pruned.plan.generation(), entry["input_ids"])
    tensors = chained_samples(pruned.plan, pruned.components, torch.from_numpy(entry["pixel_values"]), ids)
    return as_arrays(tensors)


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
    if report.episode is not None and not report.episode.passed:
        where = report.episode.first_difference
        if where is None:
            return "the carried history drifts beyond tolerance over the episode (kept tokens and actions agree)"
        return (
            f"the exported policy's episode differs from eager at episode {where[0]}, step {where[1]} although every "
            "graph matches on its samples: a selection or argmax near-tie, carried on by the state"
        )
    if report.generation is not None and not report.generation.passed:
        sample, row, position = report.generation.first_difference or [0, 0, 0]
        return (
            f"greedy generation differs from eager (sample {sample}, row {row}, from token {position}) although every "
            "component matches within tolerance: an argmax near-tie"
        )
    return "exported outputs match eager"


def _check_component(
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
        rows_equal = np.all(got[KEPT_INDICES] == want[KEPT_INDICES], axis=-1)
        report.kept_rows += rows_equal.size
        report.kept_rows_agreeing += int(rows_equal.sum())
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


def _check_generation(pruned: Pruned, exported: GenerationLoop, seeds: list[int]) -> GenerationCheck:
    eager = eager_loop(pruned)
    check = GenerationCheck(len(seeds), pruned.plan.max_new_tokens, 0, 0)
    for sample, seed in enumerate(seeds):
        pixels, ids = generation_inputs(pruned, seed)
        want = eager.generate(pixels, ids, stop_at_eos=False)
        got = exported.generate(pixels, ids, stop_at_eos=False)
        equal = np.all(got == want, axis=1)
        check.rows += equal.size
        check.rows_equal += int(equal.sum())
        if check.first_difference is None and not equal.all():
            row = int(np.argmin(equal))
            check.first_difference = [sample, row, int(np.argmax(got[row] != want[row]))]
    return check


def _check_episode(pruned: Pruned, sessions: dict[str, Any], seeds: list[int], tolerance: Tolerance) -> EpisodeCheck:
    from tpc.runtimes.policy import Policy
    from tpc.vla import eager_policy

    eager = eager_policy(pruned.plan, pruned.components)
    exported = Policy({name: pair[0].run for name, pair in sessions.items()}, eager.policy)
    check = EpisodeCheck(len(seeds), episode_steps(pruned), 0, 0)
    for episode, seed in enumerate(seeds):
        frames, ids = policy_episode(pruned, seed)
        eager.reset()
        exported.reset()
        for step, frame in enumerate(frames):
            want, got = eager.step_result(frame, ids), exported.step_result(frame, ids)
            same = np.array_equal(got.kept_indices, want.kept_indices) and np.array_equal(got.tokens, want.tokens)
            check.total_steps += 1
            check.steps_agreeing += int(same)
            if not same and check.first_difference is None:
                check.first_difference = [episode, step]
            if want.history is not None:
                check.history = Diff.of(got.history, want.history, tolerance).worst(check.history)
    return check


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
    sessions = {}  # opened first: a runtime that cannot run here says so before any model is loaded
    for spec in manifest.components:
        selects = any(o.name == KEPT_INDICES for o in spec.outputs)
        forced = open_component(runtime, directory, spec, teacher_forced=True) if selects else None
        sessions[spec.name] = (open_component(runtime, directory, spec), forced)
    if pruned is None:
        with step("load eager model"):
            pruned = build(request_from_manifest(manifest))
    seeds = [manifest.sample_seed + i for i in range(samples)]
    if inputs_file is not None:
        sample_inputs = [_sample_inputs(pruned, _load_user_inputs(Path(inputs_file), _entry_specs(manifest)))]
    else:
        sample_inputs = [{c.name: read_samples(directory, c.name, INPUTS_FILE) for c in manifest.components}]
        for seed in seeds[1:]:
            sample_inputs.append(as_arrays(pruned.samples(seed)))

    tolerance = TOLERANCES[manifest.dtype]
    report = VerifyReport(
        True, runtime.name, len(sample_inputs), tolerance.atol, tolerance.rtol, tolerance.atol_scaled_by_max, 0, 0
    )
    with step(f"verify {len(sample_inputs)} samples in {runtime.name}"):
        for inputs in sample_inputs:
            for name, component in pruned.components.items():
                label = "" if name == SINGLE else f"{name}."
                _check_component(report, component, label, sessions[name], inputs[name], tolerance)
    if manifest.generation is not None:
        with step(f"greedy generation, {pruned.plan.max_new_tokens} tokens x {len(seeds)} prompts"):
            loop = GenerationLoop({name: pair[0].run for name, pair in sessions.items()}, manifest.generation)
            report.generation = _check_generation(pruned, loop, seeds)
    if manifest.policy is not None:
        episodes = seeds[: max(1, min(2, len(seeds)))]
        with step(f"replay {len(episodes)} seeded episodes of {episode_steps(pruned)} steps, exported vs eager"):
            report.episode = _check_episode(pruned, sessions, episodes, tolerance)
    report.passed = (
        report.kept_rows_agreeing == report.kept_rows
        and all(d.passed for d in report.outputs.values())
        and all(d.passed for d in report.teacher_forced.values())
        and (report.generation is None or report.generation.passed)
        and (report.episode is None or report.episode.passed)
    )
    report.diagnosis = _diagnose(report)
    return report
