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

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpc.contract.manifest import (
    EPISODE_FILE,
    EXPECTED_FILE,
    GENERATION_FILE,
    INPUTS_FILE,
    SAMPLES_DIR,
    ComponentSpec,
    Manifest,
    TensorSpec,
    changed_files,
    inside,
    load_npz,
    read_npz,
    samples_dir,
)
from tpc.contract.names import KEPT_INDICES, Session
from tpc.errors import RuntimeUnavailable, UsageError
from tpc.exporter import runtime_for
from tpc.pipeline import SINGLE, Component, Pruned, PruneRequest, as_arrays, build, eager_outputs, seeded_pixels
from tpc.progress import Step, silent
from tpc.runtimes.base import open_component
from tpc.runtimes.generation import GenerationLoop, prefill_ids


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_scaled_by_max: bool = False  # atol multiplies max|eager output|


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(4e-3, 1e-2, atol_scaled_by_max=True)}


@dataclass
class Diff:
    """`margin`: max over elements of |got - want| / (atol + rtol * |want|), the element that decides; the rule
    passes iff it is <= 1 (a NaN or a shape mismatch is an infinite margin). max_abs / max_rel for reference."""

    max_abs: float
    max_rel: float
    passed: bool
    margin: float = 0.0

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> Diff:
        if np.shape(got) != np.shape(want):
            return cls(math.inf, math.inf, False, math.inf)
        got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
        error = np.abs(got64 - want64)
        atol = tolerance.atol * (float(np.abs(want64).max(initial=1.0)) if tolerance.atol_scaled_by_max else 1.0)
        allowed = np.maximum(atol + tolerance.rtol * np.abs(want64), np.finfo(np.float64).tiny)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = error / allowed
        margin = math.inf if np.isnan(ratio).any() else float(ratio.max(initial=0.0))
        return cls(
            max_abs=float(error.max(initial=0.0)),
            max_rel=float((error / np.maximum(np.abs(want64), 1e-12)).max(initial=0.0)),
            passed=bool(margin <= 1.0),
            margin=margin,
        )

    def worst(self, other: Diff | None) -> Diff:
        if other is None:
            return self
        return Diff(
            max(self.max_abs, other.max_abs),
            max(self.max_rel, other.max_rel),
            self.passed and other.passed,
            max(self.margin, other.margin),
        )


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
class ShippedCheck:
    """One check of the export's own files: what was checked, whether it held, and what differs if not."""

    check: str
    passed: bool
    detail: str = ""


PASS_RULE = "elementwise |exported - eager| <= atol + rtol * |eager|"


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
    kept: dict[str, list[int]] = field(default_factory=dict)  # per kept_indices output: [rows agreeing, rows]
    shipped: list[ShippedCheck] = field(default_factory=list)  # the export's own files (check_shipped)
    rule: str = PASS_RULE

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data: a NaN or infinite number becomes the string "nan" / "inf" / "-inf"."""
        data = asdict(self)
        for name in ("generation", "episode"):
            if getattr(self, name) is not None:
                data[name]["passed"] = getattr(self, name).passed
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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
    runtime = runtime_for(manifest.target)
    tolerance = TOLERANCES[manifest.dtype]
    report = VerifyReport(True, runtime.name, 0, tolerance.atol, tolerance.rtol, tolerance.atol_scaled_by_max, 0, 0)
    entry = _load_user_inputs(Path(inputs_file), _entry_specs(manifest)) if inputs_file is not None else None
    with step("check the export's own files: hashes, I/O against the artifacts, samples"):
        shipped = check_shipped(directory, manifest, runtime.name)
    report.shipped = shipped.checks
    if not shipped.passed:
        return _finish(report)  # nothing runs files that are not what the export wrote
    sessions: dict[str, tuple[Session, Session | None]] | None = {}
    unavailable = None
    try:  # opened before the model: a corrupt artifact or a missing runtime says so before any weights load
        for spec in manifest.components:
            selects = any(o.name == KEPT_INDICES for o in spec.outputs)
            forced = open_component(runtime, directory, spec, teacher_forced=True) if selects else None
            sessions[spec.name] = (open_component(runtime, directory, spec), forced)
    except RuntimeUnavailable as error:
        sessions, unavailable = None, error
    if pruned is None:
        with step("load eager model"):
            pruned = build(request_from_manifest(manifest))
    with step("compare the shipped samples with eager"):
        _check_samples_against_eager(report, pruned, manifest, shipped, directory, tolerance)
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
        sample_inputs = [_sample_inputs(pruned, entry)]
    else:
        first = {c.name: shipped.samples[sample_file(directory, c.name, INPUTS_FILE)] for c in manifest.components}
        sample_inputs = [first] + [as_arrays(pruned.samples(seed)) for seed in seeds[1:]]
    report.samples = len(sample_inputs)
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
    return _finish(report)


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


def _check_samples_against_eager(
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
                    problems.append(f"{output} differ from eager's ({_first_difference(stored[output], array)})")
                continue
            diff = Diff.of(stored[output], array, tolerance)
            if not diff.passed:
                problems.append(f"{output}: margin {diff.margin:.3g} > 1 (max abs {diff.max_abs:.3g})")
        report.shipped.append(
            ShippedCheck(f"{expected_file} = eager on {inputs_file}", not problems, "; ".join(problems[:4]))
        )
    generation_file = f"{SAMPLES_DIR}/{GENERATION_FILE}"
    if generation_file in shipped.samples:
        report.shipped.append(_check_generation_sample(pruned, manifest, shipped.samples[generation_file]))
    episode_file = f"{SAMPLES_DIR}/{EPISODE_FILE}"
    if episode_file in shipped.samples:
        report.shipped.append(_check_episode_sample(pruned, shipped.samples[episode_file], tolerance))


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {list(got.shape)} vs {list(want.shape)}"
    where = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f"first at {list(where)}: {got[where]} vs eager {want[where]}"


def _check_generation_sample(pruned: Pruned, manifest: Manifest, sample: dict[str, np.ndarray]) -> ShippedCheck:
    name = f"{SAMPLES_DIR}/{GENERATION_FILE}: tokens = eager greedy generation on its inputs"
    pixels = next(s for s in manifest.component("vision").inputs if s.name == "pixel_values")
    layout = {
        "pixel_values": (pixels.shape, pixels.dtype),
        "input_ids": ([manifest.batch, manifest.generation["prompt"]["length"]], "int64"),
        "tokens": ([manifest.batch, manifest.generation["max_new_tokens"]], "int64"),
    }
    problems = _array_problems(sample, layout)
    if not problems:
        try:
            want = eager_loop(pruned).generate(sample["pixel_values"], sample["input_ids"], stop_at_eos=False)
        except Exception as err:  # a forged prompt eager cannot run
            return ShippedCheck(name, False, f"eager PyTorch cannot run its inputs ({type(err).__name__}: {err})"[:240])
        if not np.array_equal(sample["tokens"], want):
            problems.append(f"tokens differ from eager's ({_first_difference(sample['tokens'], np.asarray(want))})")
    return ShippedCheck(name, not problems, "; ".join(problems[:4]))


def _check_episode_sample(pruned: Pruned, sample: dict[str, np.ndarray], tolerance: Tolerance) -> ShippedCheck:
    from tpc.vla import eager_policy

    name = f"{SAMPLES_DIR}/{EPISODE_FILE}: every step = eager policy on its frames"
    runner = eager_policy(pruned.plan, pruned.components)
    keys = {"images", "input_ids", "action_tokens", "actions", "kept_mask", "graph"} | (
        {"history"} if runner.stateful else set()
    )
    if set(sample) != keys:
        return ShippedCheck(name, False, f"arrays {sorted(sample)}; an episode sample holds {sorted(keys)}")
    steps = len(sample["images"])
    if any(len(sample[key]) != steps for key in keys - {"input_ids"}) or steps == 0:
        return ShippedCheck(name, False, "its arrays hold different numbers of steps")
    try:
        results = [runner.step_result(frame, sample["input_ids"]) for frame in sample["images"]]
    except Exception as err:  # forged frames or prompt eager cannot run
        return ShippedCheck(name, False, f"eager PyTorch cannot run its inputs ({type(err).__name__}: {err})"[:240])
    problems = []
    kept_mask = np.zeros_like(sample["kept_mask"])
    for step_index, result in enumerate(results):
        kept_mask[step_index, result.kept_indices] = True
    exact = {
        "action_tokens": np.stack([r.tokens for r in results]),
        "kept_mask": kept_mask,
        "graph": np.array([r.graph for r in results]),
    }
    for key, want in exact.items():
        if not np.array_equal(sample[key], want):
            problems.append(f"{key} differ from eager's ({_first_difference(sample[key], want)})")
    close = {"actions": np.stack([r.action for r in results])}
    if runner.stateful:
        close["history"] = np.stack([r.history for r in results])
    for key, want in close.items():
        diff = Diff.of(sample[key], want, tolerance)
        if not diff.passed:
            problems.append(f"{key}: margin {diff.margin:.3g} > 1 (max abs {diff.max_abs:.3g})")
    return ShippedCheck(name, not problems, "; ".join(problems[:4]))


# --- the export's own files ------------------------------------------------------------------------------------


@dataclass
class Shipped:
    """What `check_shipped` read: the checks, and every sample file's arrays by its path in the export."""

    checks: list[ShippedCheck] = field(default_factory=list)
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def add(self, check: str, problems: list[str]) -> bool:
        self.checks.append(
            ShippedCheck(check, not problems, "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
        )
        return not problems


def sample_file(directory: Path, component: str, name: str) -> str:
    """A component's sample file, relative to the export directory."""
    return samples_dir(directory, component).relative_to(directory).as_posix() + "/" + name


def sample_files(directory: Path, manifest: Manifest) -> list[str]:
    """Every sample file the manifest implies (relative paths)."""
    files = []
    for component in manifest.components:
        for spec in [component, *component.stages]:
            files += [sample_file(directory, spec.name, INPUTS_FILE), sample_file(directory, spec.name, EXPECTED_FILE)]
    if manifest.generation is not None:
        files.append(f"{SAMPLES_DIR}/{GENERATION_FILE}")
    if manifest.policy is not None:
        files.append(f"{SAMPLES_DIR}/{EPISODE_FILE}")
    return files


def check_shipped(directory: Path, manifest: Manifest, runtime: str) -> Shipped:
    """Hashes, then (only if every file is as exported) the manifest against the artifacts and the samples'
    structure. Missing or unreadable files raise UsageError."""
    shipped = Shipped()
    for relative in manifest.named_files():
        if not inside(directory, relative, "artifact").exists():
            raise UsageError(f"'{directory / relative}' is missing: the export is incomplete (re-export it)")
    for relative in sample_files(directory, manifest):
        shipped.samples[relative] = read_npz(directory, relative)
    changed, missing, added = changed_files(directory, manifest)
    if missing:
        raise UsageError(f"'{directory}' lacks {', '.join(missing[:4])}, recorded at export: the export is incomplete")
    recorded = set(manifest.files)
    unrecorded = [
        relative
        for relative in [*manifest.named_files(), *sample_files(directory, manifest)]
        if relative not in recorded and not any(name.startswith(relative.rstrip("/") + "/") for name in recorded)
    ]
    problems = (
        [f"{name} changed since export" for name in changed]
        + [f"{name} has no recorded hash" for name in unrecorded]
        + [f"{name} was added since export" for name in added if name not in unrecorded]
    )
    if not shipped.add(f"{len(recorded)} files match the sha256 recorded in tpc.json", problems):
        return shipped  # nothing else is read from files that are not what the export wrote
    for component in manifest.components:
        for spec in component.methods:
            shipped.add(f"tpc.json I/O = {_where(spec)}", _io_problems(directory, spec, runtime, forced=False))
            if spec.teacher_forced is not None:
                check = f"tpc.json I/O = {spec.teacher_forced}" + (f" method {spec.method}" if spec.method else "")
                shipped.add(check, _io_problems(directory, spec, runtime, forced=True))
    for component in manifest.components:
        for spec in [component, *component.stages]:
            for name, tensors in ((INPUTS_FILE, spec.inputs), (EXPECTED_FILE, spec.outputs)):
                relative = sample_file(directory, spec.name, name)
                problems = _array_problems(shipped.samples[relative], {t.name: (t.shape, t.dtype) for t in tensors})
                if name == EXPECTED_FILE and KEPT_INDICES in shipped.samples[relative] and not problems:
                    problems += kept_problems(shipped.samples[relative][KEPT_INDICES], index_bound(manifest))
                shipped.add(f"{relative}: names, shapes, dtypes as tpc.json", problems)
    return shipped


def index_bound(manifest: Manifest) -> int:
    """Kept indices lie in [0, this): every visual token (and prefix token) a graph chooses among."""
    return int(manifest.tokens["before"]) + int(manifest.tokens.get("prefix_tokens", 0))


def kept_problems(kept: np.ndarray, bound: int) -> list[str]:
    """Kept indices must be integers, strictly ascending along the last axis and in [0, bound)."""
    if kept.dtype.kind not in "iu":
        return [f"kept_indices are {kept.dtype}, not integers"]
    if kept.size and (kept.min() < 0 or kept.max() >= bound):
        return [f"kept_indices out of range [0, {bound}) (min {kept.min()}, max {kept.max()})"]
    if kept.shape[-1] > 1 and not np.all(np.diff(kept, axis=-1) > 0):
        return ["kept_indices are not strictly ascending"]
    return []


def _array_problems(arrays: dict[str, np.ndarray], expected: dict[str, tuple[list[int], str]]) -> list[str]:
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


def _where(spec: ComponentSpec) -> str:
    return spec.artifact + (f" method {spec.method}" if spec.method else "")


def _io_problems(directory: Path, spec: ComponentSpec, runtime: str, forced: bool) -> list[str]:
    """Differences between the manifest's I/O for `spec` and the artifact's own declaration of it."""
    relative = spec.teacher_forced if forced else spec.artifact
    path = inside(directory, relative, "artifact")
    want_inputs = {t.name: (list(t.shape), t.dtype) for t in spec.inputs}
    if forced:
        kept = next((t for t in spec.outputs if t.name == KEPT_INDICES), None)
        if kept is not None:
            want_inputs[KEPT_INDICES] = (list(kept.shape), kept.dtype)
    want_outputs = {t.name: (list(t.shape), t.dtype) for t in spec.outputs}
    try:
        if runtime in ("onnxruntime", "tensorrt"):
            got_inputs, got_outputs = _onnx_io(path)
        elif runtime == "executorch":
            got_inputs, got_outputs = _executorch_io(path, spec, list(want_inputs), list(want_outputs))
        elif runtime == "coreml":
            got_inputs, got_outputs = _coreml_io(path, want_inputs, want_outputs)
        else:
            return []
    except UsageError:
        raise
    except Exception as err:  # a parser's own error on a file that is not what it claims
        raise UsageError(f"'{path}' cannot be read as a {runtime} artifact ({type(err).__name__}: {err})") from None
    problems = []
    for kind, want, got in (("input", want_inputs, got_inputs), ("output", want_outputs, got_outputs)):
        for name in sorted(set(want) | set(got)):
            if name not in got:
                problems.append(f"{kind} {name} is in tpc.json, not in {relative}")
            elif name not in want:
                problems.append(f"{kind} {name} is in {relative}, not in tpc.json")
            elif got[name] != want[name]:
                (gs, gd), (ws, wd) = got[name], want[name]
                problems.append(f"{kind} {name}: tpc.json says {wd}{ws}, {relative} has {gd}{gs}")
    return problems


IO = dict[str, tuple[list[Any], str]]


def _onnx_io(path: Path) -> tuple[IO, IO]:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def described(values: Any, skip: set[str]) -> IO:
        io = {}
        for value in values:
            if value.name in skip:  # an input with an initializer is a constant (older ONNX IR), not an input
                continue
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            io[value.name] = (shape, str(np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type))))
        return io

    return described(model.graph.input, initializers), described(model.graph.output, set())


# ExecuTorch ScalarType codes -> numpy dtype names
_ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
              11: "bool", 15: "bfloat16"}  # fmt: skip


def _executorch_io(path: Path, spec: ComponentSpec, inputs: list[str], outputs: list[str]) -> tuple[IO, IO]:
    """A `.pte` method has positions, not names: the manifest's names are given to its positions in order."""
    from executorch.runtime import Runtime as ETRuntime

    from tpc.runtimes.executorch import captured_stderr

    with captured_stderr():
        meta = ETRuntime.get().load_program(path).metadata(spec.method or "forward")

    def described(count: int, tensor_meta: Any, names: list[str]) -> IO:
        io = {}
        for position in range(count):
            info = tensor_meta(position)
            name = names[position] if position < len(names) else f"#{position}"
            code = info.dtype()
            io[name] = ([int(d) for d in info.sizes()], _ET_DTYPES.get(int(code), str(code)))
        return io

    return (
        described(meta.num_inputs(), meta.input_tensor_meta, inputs),
        described(meta.num_outputs(), meta.output_tensor_meta, outputs),
    )


def _coreml_io(path: Path, want_inputs: IO, want_outputs: IO) -> tuple[IO, IO]:
    """The package's model description; Core ML has no int64 (int32 stands for it) and the runtime returns each
    output in the eager dtype recorded in the model's metadata."""
    import json

    import coremltools as ct

    from tpc.runtimes.coreml import ARRAY_DTYPES, NAMES_KEY, OUTPUT_DTYPES_KEY

    description = ct.utils.load_spec(str(path)).description
    user = dict(description.metadata.userDefined)
    names = json.loads(user.get(NAMES_KEY, "{}"))
    output_dtypes = json.loads(user.get(OUTPUT_DTYPES_KEY, "{}"))

    def described(features: Any, want: IO, dtypes: dict[str, str]) -> IO:
        io = {}
        for feature in features:
            name = names.get(feature.name, feature.name)
            array = feature.type.multiArrayType
            dtype = dtypes.get(name) or ARRAY_DTYPES.get(array.dataType, str(array.dataType))
            if dtype == "int32" and want.get(name, ([], ""))[1] == "int64":
                dtype = "int64"  # the runtime casts int64 <-> int32
            io[name] = ([int(d) for d in array.shape], dtype)
        return io

    return described(description.input, want_inputs, {}), described(description.output, want_outputs, output_dtypes)
