"""Planning and building an OpenVLA-style policy export: one static graph per control step, state as tensors.

The unpruned policy and FastV are stateless: one graph, `step`. VLA-Pruner carries the history of action
attention between steps and does not prune until it holds `window` vectors (the reference's warm-up), so it
exports two graphs of the same interface: `warmup` (every image token kept) and `pruned` (K kept, guided by
the history); the runtime picks one per step (`tpc.runtimes.policy`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpc.contract.cost import StageCost, total_flops
from tpc.contract.manifest import EPISODE_FILE, SAMPLES_DIR, Manifest, TensorSpec, write_npz
from tpc.contract.names import HISTORY_INPUT, HISTORY_OUTPUT, PROJECTOR, PRUNED, STEP, TAPS, TOWER, WARMUP
from tpc.contract.protocols import (
    DecoderLengths,
    HistoryLength,
    HistorySpec,
    ImageSpec,
    Normalization,
    PolicyPromptSpec,
    PolicyProtocol,
    PolicyState,
)
from tpc.contract.report import Diff, EpisodeCheck, ShippedCheck, Tolerance, VerifyReport
from tpc.errors import UsageError
from tpc.exporter.base import ExportPart
from tpc.kinds.base import (
    DTYPES,
    Component,
    CostScale,
    DecoderPlan,
    Kind,
    Pruned,
    PruneRequest,
    Sessions,
    check_accepts,
    check_budget,
    check_method_layers,
    check_positions,
    decode_costs,
    eager_outputs,
    merged,
    prefill_costs,
    resolve_keep,
    vit_weights,
)
from tpc.kinds.checks import first_difference
from tpc.kinds.vlm import render_ranges, schedule_point, schedule_taps
from tpc.methods import PrefillMethod, get_method
from tpc.methods.schedule import PromptImages, TokenSchedule
from tpc.models_zoo import ModelSource, OpenVlaAdapter
from tpc.models_zoo.openvla import (
    EMPTY_TOKEN_ID,
    PROMPT_TEMPLATE,
    TOWER_NORMALIZATION,
    OpenVlaConfig,
    PolicyGeometry,
    action_stats,
)
from tpc.passes.decoder import DecoderLayout
from tpc.passes.policy_stages import StagePart, policy_stages, prefill_stage
from tpc.passes.policy_step import PolicyStep
from tpc.progress import Step
from tpc.runtimes.policy import Policy, StepResult, preprocess
from tpc.runtimes.staged import STAGES_PROTOCOL


@dataclass(frozen=True)
class VlaPlan(DecoderPlan):
    """A validated policy request: method, budget, the static prompt, the action head."""

    unnorm_key: str | None

    @property
    def adapter(self) -> OpenVlaAdapter:
        return openvla_parts(self.source)[0]

    @property
    def config(self) -> OpenVlaConfig:
        return openvla_parts(self.source)[1]

    @property
    def geometry(self) -> PolicyGeometry:
        return self.adapter.policy(self.config, self.unnorm_key)

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, and the dataset whose statistics un-normalise actions when one was chosen."""
        return {**self.method_params, **({"unnorm_key": self.unnorm_key} if self.unnorm_key else {})}

    @property
    def stateful(self) -> bool:
        return getattr(self.method, "stateful", False)

    @property
    def component_names(self) -> tuple[str, ...]:
        return (WARMUP, PRUNED) if self.stateful else (STEP,)

    def layout(self, pruned: bool = True) -> DecoderLayout:
        """The step's decoder layout: the method's token schedule (`pruned`), or every image token at every layer
        (the unpruned policy, VLA-Pruner's warm-up steps)."""
        image_tokens, start = self.prompt.image_tokens, self.prompt.image_start
        prunes = pruned and isinstance(self.method, PrefillMethod)
        images = PromptImages((start,), (image_tokens,), self.prompt.length)
        schedule = (
            self.method.schedule(self.method_params, self.keep, images) if prunes else TokenSchedule(image_tokens)
        )
        return DecoderLayout(
            (start,), self.prompt.text_len, schedule, self.decoder.num_layers, self.geometry.action_dim - 1
        )

    @property
    def kept_widths(self) -> tuple[int, ...]:
        return self.layout().schedule.kept_widths

    def flops(self, pruned: bool = True) -> dict[str, int]:
        """2x multiply-adds of one control step, pruned by the method's schedule or not (from `step_costs`)."""
        towers, prefill, decode = self.step_parts(pruned, CostScale())
        flops = {stage: sum(c.flops for c in towers if c.stage == stage) for stage in (TOWER, PROJECTOR)}
        parts = {"towers": flops[TOWER], "projector": flops[PROJECTOR]}
        parts |= {"prefill": total_flops(prefill), "decode": total_flops(decode)}
        return {**parts, "step": sum(parts.values())}

    def step_parts(
        self, pruned: bool, scale: CostScale, component: str = STEP
    ) -> tuple[list[StageCost], list[StageCost], list[StageCost]]:
        """One control step's costs in three parts: the towers and projector (every image token: the towers are
        never pruned), the prefill (its taps, selects and first LM head), the unrolled decode of the other action
        tokens."""
        geometry, decoder, layout = self.geometry, self.decoder, self.layout(pruned)
        vision = sum(spec.hidden_size for spec in geometry.towers)
        d, n = decoder.hidden_size, geometry.image_tokens
        tower_weights = sum(
            (s.num_layers - 1) * vit_weights(s.hidden_size, s.intermediate_size) for s in geometry.towers
        )
        tower_values = sum(2 * (s.prefix_tokens + n) * s.hidden_size for s in geometry.towers)
        towers = geometry.tower_flops()
        weights = vision * 4 * vision + 4 * vision * d + d * d
        projector = 2 * n * weights
        vision_side = [
            scale.cost(component, TOWER, towers, tower_weights, tower_values, towers),
            scale.cost(component, PROJECTOR, projector, weights, n * (vision + d), projector),
        ]
        prefill = prefill_costs(component, layout, decoder, scale)
        if self.stateful:  # the history's tap: the action queries' rows of one layer's attention to the image
            prefill.append(scale.cost(component, TAPS, 0, 0, 2 * geometry.action_dim * n * decoder.hidden_size))
        decode = decode_costs(component, layout, decoder, geometry.action_dim - 1, scale, static=False)
        return vision_side, prefill, decode

    def stage_costs(self, scale: CostScale) -> list[StageCost]:
        """One call of each step graph: `step`, or VLA-Pruner's `warmup` (nothing pruned) and `pruned`."""
        costs = []
        for name in self.component_names:
            costs += merged([cost for part in self.step_parts(name != WARMUP, scale, name) for cost in part])
        return costs

    def policy(self) -> PolicyProtocol:
        """What a runtime needs to drive the graphs and carry the state (written to tpc.json as `policy`)."""
        geometry, prompt = self.geometry, self.prompt
        window = self.method_params.get("window", 0)
        state = None
        if self.stateful:
            state = PolicyState(
                HistorySpec((window, prompt.image_tokens), "float32", "zeros", HISTORY_INPUT, HISTORY_OUTPUT,
                            "oldest first"),
                HistoryLength(0, window, "min(history_len + 1, window)"),
            )  # fmt: skip
            graphs = {WARMUP: "while history_len < window (every image token kept)", PRUNED: "once it is full"}
            protocol = (
                "reset: history = zeros, history_len = 0. step(image, prompt ids): graph = warmup if history_len < "
                "window else pruned; outputs = graph(pixel_values, input_ids, history); history = history_next; "
                "history_len = min(history_len + 1, window); action = decode(action_tokens)"
            )
        else:
            graphs = {STEP: "every step"}
            protocol = "step(image, prompt ids): action_tokens = step(pixel_values, input_ids); decode them"
        return PolicyProtocol(
            action_dim=geometry.action_dim,
            n_action_bins=geometry.n_action_bins,
            action_vocab_size=geometry.action_vocab_size,
            unnorm_key=self.unnorm_key,
            action_stats=action_stats(self.config, self.unnorm_key),
            image=ImageSpec(geometry.image_size, tuple(tower_normalization(s.family) for s in geometry.towers)),
            prompt=PolicyPromptSpec(
                text_tokens=prompt.text_len,
                image_start=prompt.image_start,
                image_tokens=prompt.image_tokens,
                length=prompt.length,
                template=PROMPT_TEMPLATE,
                empty_token_id=EMPTY_TOKEN_ID,
            ),
            kept_image_tokens=self.keep,
            decoder_lengths=DecoderLengths(
                pruned=tuple(self.layout().kept_lengths),
                full=tuple(self.layout(pruned=False).kept_lengths),
            ),
            state=state,
            graphs=graphs,
            protocol=protocol,
        )


def tower_normalization(family: str) -> Normalization:
    """How the release's processor normalises a tower's pixels."""
    stats = TOWER_NORMALIZATION[family]
    return Normalization(family, tuple(stats["mean"]), tuple(stats["std"]))


def openvla_parts(source: ModelSource) -> tuple[OpenVlaAdapter, OpenVlaConfig]:
    """A policy's adapter and config, typed (a policy's family is OpenVLA's, whose configs load as OpenVlaConfig)."""
    adapter, config = source.adapter, source.config
    assert isinstance(adapter, OpenVlaAdapter) and isinstance(config, OpenVlaConfig), "a policy is an OpenVLA model"
    return adapter, config


def plan_vla(request: PruneRequest, source: ModelSource) -> VlaPlan:
    adapter, config = openvla_parts(source)
    method = get_method(request.method)
    check_accepts(adapter, method, "does not apply to {family} policies (their towers are not pruned)")
    if request.batch != 1:
        raise UsageError(f"--batch {request.batch}: a policy export runs one robot's step per call (batch 1)")
    if request.dtype != "fp32":
        raise UsageError(f"--dtype {request.dtype}: policy exports are fp32 for now (the step graph's argmax decode)")
    if request.max_new_tokens is not None:
        raise UsageError("--max-new-tokens does not apply to a policy: it decodes one token per action dimension")
    method_params = dict(request.params)
    unnorm_key = method_params.pop("unnorm_key", None)
    decoder = adapter.decoder(config)
    derived = method.model_defaults(decoder.num_layers) if isinstance(method, PrefillMethod) else {}
    params = method.resolve_params(method_params, derived)
    check_method_layers(method, params, {"decoder": (1, decoder.num_layers - 1)})
    num_image = adapter.policy(config, unnorm_key).image_tokens
    keep = resolve_keep(request.keep, method, num_image, 1, "the policy sees {n} image tokens per step")
    check_budget(method, keep, params)
    layout = adapter.default_layout(config, request.prompt_len)
    action_dim = adapter.policy(config, unnorm_key).action_dim
    check_positions(
        layout.length + action_dim,
        decoder.max_positions,
        f"the prompt ({layout.text_len} text + {layout.image_tokens} image tokens) and {action_dim} action tokens",
        "lower --prompt-len",
    )
    return VlaPlan(request, source, method, keep, params, layout, unnorm_key)


def build_vla(plan: VlaPlan) -> Pruned:
    """Each graph gets its own model loaded through `from_pretrained` (graphs tap different layers)."""
    source, adapter, request = plan.source, plan.adapter, plan.request
    dtype = DTYPES[request.dtype]

    def step(pruned: bool, history_layer: int | None) -> Component:
        # transformers wraps PreTrainedModel.to (functools.wraps of nn.Module.to): mypy does not bind its self
        model = adapter.load(source.path).to(dtype)  # type: ignore[arg-type]
        method = plan.method if pruned and isinstance(plan.method, PrefillMethod) else None
        module = PolicyStep(model, adapter, plan.layout(pruned), method, plan.method_params, history_layer).eval()
        return Component("", module, module.input_names, module.output_names)

    if plan.stateful:
        history_layer = plan.method_params["history_layer"]
        parts = {WARMUP: step(False, history_layer), PRUNED: step(True, history_layer)}
    else:
        parts = {STEP: step(True, None)}
    for name, component in parts.items():
        component.name = name

    def samples(seed: int) -> dict[str, dict[str, Tensor]]:
        return component_samples(plan, parts, seed)

    return Pruned(request, plan, parts, samples)


def seeded_frames(plan: VlaPlan, seed: int, steps: int) -> list[np.ndarray]:
    """An episode's camera frames of any length: a seeded low-frequency scene, shifting a little each step (wrapping
    around, so the scene never runs out), plus per-frame noise (uint8 RGB)."""
    size = plan.geometry.image_size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(-(-size // 16), -(-size // 16), 3), dtype=np.uint8)
    scene = np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))[:size, :size]
    noise = rng.integers(0, 24, size=(steps, size, size, 3), dtype=np.uint8)
    return [(np.roll(scene, (3 * t, 2 * t), axis=(0, 1)) // 2 + noise[t]).astype(np.uint8) for t in range(steps)]


def seeded_prompt(plan: VlaPlan, seed: int) -> np.ndarray:
    """(1, T) prompt ids: BOS, seeded text ids below the action bins, the release's trailing empty token."""
    rng = np.random.default_rng(10_000 + seed)
    geometry = plan.geometry
    high = geometry.action_vocab_size - geometry.n_action_bins
    ids = rng.integers(3, max(4, high), size=plan.prompt.text_len, dtype=np.int64)
    ids[0] = 1
    if EMPTY_TOKEN_ID < plan.decoder.vocab_size:
        ids[-1] = EMPTY_TOKEN_ID
    return ids[None]


def eager_policy(plan: VlaPlan, components: dict[str, Component]) -> Policy:
    """The eager graphs behind the runtime's `Policy` loop: what an exported policy must reproduce."""
    runs = {name: functools.partial(eager_outputs, component) for name, component in components.items()}
    return Policy(runs, plan.policy())


def component_samples(plan: VlaPlan, components: dict[str, Component], seed: int) -> dict[str, dict[str, Tensor]]:
    """Each graph's inputs: a seeded episode's first frame, and for `pruned` the frame after the warm-up with the
    history the eager warm-up steps left."""
    window = plan.method_params.get("window", 0)
    frames = seeded_frames(plan, seed, window + 1)
    ids = seeded_prompt(plan, seed)
    policy = plan.policy()
    first = {"pixel_values": preprocess(frames[0], policy), "input_ids": ids}
    if not plan.stateful:
        return {STEP: {k: torch.from_numpy(v) for k, v in first.items()}}
    runner = eager_policy(plan, components)
    for frame in frames[:window]:
        runner.step(frame, ids)
    history = runner.history_spec
    assert history is not None, "a stateful plan's policy carries its history"
    samples = {
        WARMUP: {**first, "history": np.zeros(history.shape, dtype=np.float32)},
        PRUNED: {"pixel_values": preprocess(frames[window], policy), "input_ids": ids, "history": runner.history},
    }
    return {name: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()} for name, s in samples.items()}


EPISODE_STEPS = 8


def episode_steps(pruned: Pruned) -> int:
    """Steps a verified episode runs: at least 8, and at least 5 pruned steps after the warm-up."""
    return max(EPISODE_STEPS, pruned.plan.method_params.get("window", 0) + 5)


def policy_episode(pruned: Pruned, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    return seeded_frames(pruned.plan, seed, episode_steps(pruned)), seeded_prompt(pruned.plan, seed)


def write_episode_sample(directory: Path, pruned: Pruned) -> None:
    """The eager policy's seeded episode, step by step: what a device without PyTorch replays and compares."""
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
        arrays["history"] = stacked_history(results)
    write_npz(directory / EPISODE_SAMPLE, arrays)


def stacked_history(results: list[StepResult]) -> np.ndarray:
    """The history after every step of a stateful policy's episode, (steps, window, image tokens)."""
    rows = [r.history for r in results if r.history is not None]
    assert len(rows) == len(results), "a stateful policy returns its history at every step"
    return np.stack(rows)


def check_episode(pruned: Pruned, sessions: Sessions, seeds: list[int], tolerance: Tolerance) -> EpisodeCheck:

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
            if want.history is not None:  # (an exported step without history is a shape mismatch: it fails)
                check.history = Diff.of(np.asarray(got.history), want.history, tolerance).worst(check.history)
    return check


def check_episode_sample(pruned: Pruned, sample: dict[str, np.ndarray], tolerance: Tolerance) -> ShippedCheck:
    name = f"{EPISODE_SAMPLE}: every step = eager policy on its frames"
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
            problems.append(f"{key} differ from eager's ({first_difference(sample[key], want)})")
    close = {"actions": np.stack([r.action for r in results])}
    if runner.stateful:
        close["history"] = stacked_history(results)
    for key, want in close.items():
        diff = Diff.of(sample[key], want, tolerance)
        if not diff.passed:
            problems.append(f"{key}: margin {diff.margin:.3g} > 1 (max abs {diff.max_abs:.3g})")
    return ShippedCheck(name, not problems, "; ".join(problems[:4]))


EPISODE_SAMPLE = f"{SAMPLES_DIR}/{EPISODE_FILE}"


def describe_policy(request: PruneRequest, source: ModelSource) -> dict[str, Any]:
    """A policy's control step: where it prunes, what it taps, its state, FLOPs per step against the unpruned one."""
    if request.keep is None:
        adapter, config = openvla_parts(source)
        request = replace(request, keep=adapter.policy(config).image_tokens // 4)
    the_plan = plan_vla(request, source)
    full = plan_vla(replace(request, method="none", keep=None, params={}), source).flops()
    flops, params = the_plan.flops(), the_plan.method_params
    schedule = the_plan.layout().schedule
    taps = schedule_taps(schedule)
    point = schedule_point(schedule) if schedule.prunes else "none: every image token reaches every decoder layer"
    if the_plan.stateful:
        taps.append({"layer": params["history_layer"], "reduction": "action attention: the 7 action queries' rows"})
    policy = the_plan.policy()
    return {
        "model": source.ref,
        "family": source.adapter.family,
        "kind": "policy",  # what `tpc inspect --json` has always said
        "method": the_plan.method.name,
        "params": the_plan.params,
        "prune_point": point,
        "taps": taps,
        "tokens": {"before": the_plan.prompt.image_tokens, "after": the_plan.keep},
        "prompt": policy.prompt.to_dict(),
        "graphs": dict(policy.graphs),
        "state": policy.state.to_dict() if policy.state is not None else {},
        "decoder_lengths": policy.decoder_lengths.to_dict(),
        "tokens_per_layer": schedule.describe(the_plan.decoder.num_layers),
        "flops": {"pruned": flops, "unpruned": full},
        "ideal_speedup": {"step": full["step"] / flops["step"]},
    }


class PolicyKind(Kind[VlaPlan]):
    def plan(self, request: PruneRequest, source: ModelSource) -> VlaPlan:
        return plan_vla(request, source)

    def build(self, plan: VlaPlan) -> Pruned:
        return build_vla(plan)

    def manifest_sections(self, plan: VlaPlan) -> dict[str, Any]:
        return {"policy": plan.policy()}

    def stage_costs(self, plan: VlaPlan) -> list[StageCost]:
        return plan.stage_costs(CostScale.of(plan.request))

    def tokens_before(self, plan: VlaPlan) -> int:
        return plan.prompt.image_tokens

    def write_samples(self, directory: Path, pruned: Pruned) -> None:
        write_episode_sample(directory, pruned)

    def sample_files(self, manifest: Manifest) -> list[str]:
        return [EPISODE_SAMPLE]

    def check_samples(
        self, pruned: Pruned, manifest: Manifest, samples: dict[str, dict[str, np.ndarray]], tolerance: Tolerance
    ) -> list[ShippedCheck]:
        return [check_episode_sample(pruned, samples[EPISODE_SAMPLE], tolerance)]

    def request_options(self, manifest: Manifest) -> dict[str, Any]:
        return {"prompt_len": manifest_policy(manifest).prompt.text_tokens}

    def entry_specs(self, manifest: Manifest) -> dict[str, TensorSpec]:
        raise UsageError("--inputs applies to encoder and VLM exports; a policy is verified on seeded episodes")

    def entry_samples(self, pruned: Pruned, entry: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        raise UsageError("--inputs applies to encoder and VLM exports; a policy is verified on seeded episodes")

    def verify_runs(
        self,
        pruned: Pruned,
        manifest: Manifest,
        sessions: Sessions,
        seeds: list[int],
        tolerance: Tolerance,
        report: VerifyReport,
        step: Step,
    ) -> None:
        episodes = seeds[: max(1, min(2, len(seeds)))]
        with step(f"replay {len(episodes)} seeded episodes of {episode_steps(pruned)} steps, exported vs eager"):
            report.episode = check_episode(pruned, sessions, episodes, tolerance)

    def describe(self, request: PruneRequest, source: ModelSource) -> dict[str, Any]:
        return describe_policy(request, source)

    def render(self, plan: dict[str, Any]) -> list[str]:
        tokens, prompt = plan["tokens"], plan["prompt"]
        lines = [
            f"[bold]{plan['model']}[/bold] ({plan['family']} policy): method {plan['method']}, {plan['params']}",
            f"prune point: {plan['prune_point']}",
            *(f"  tap decoder layer {tap['layer']}: {tap['reduction']}" for tap in plan["taps"]),
            f"prompt: BOS + {prompt['image_tokens']} image tokens + {prompt['text_tokens'] - 1} text tokens; "
            f"image tokens {tokens['before']} -> {tokens['after']}; "
            f"decoder lengths {plan['decoder_lengths']['pruned']}",
            f"image tokens per decoder layer range: {render_ranges(plan['tokens_per_layer'])}",
            f"graphs: {plan['graphs']}",
        ]
        if plan["state"]:
            lines.append(f"state carried between steps: {plan['state']}")
        full, pruned = plan["flops"]["unpruned"], plan["flops"]["pruned"]
        for stage in ("towers", "projector", "prefill", "decode", "step"):
            lines.append(f"  {stage} GFLOPs: {full[stage] / 1e9:.3f} unpruned -> {pruned[stage] / 1e9:.3f}")
        lines.append(f"FLOPs-ideal speedup per step: {plan['ideal_speedup']['step']:.2f}x")
        return lines

    def stages(self, parts: dict[str, ExportPart]) -> dict[str, dict[str, StagePart]]:
        """Every step graph as its prefill and one decode step (`tpc.passes.policy_stages`)."""
        return {name: policy_stages(policy_step(part), part.inputs) for name, part in parts.items()}

    def forced_first_stage(self, part: ExportPart, kept_indices: Tensor) -> StagePart:
        return prefill_stage(policy_step(part), part.inputs, kept_indices)

    def record_stages(self, manifest: Manifest) -> None:
        manifest.policy = replace(manifest_policy(manifest), stages=STAGES_PROTOCOL)


def policy_step(part: ExportPart) -> PolicyStep:
    """A policy component's module: its step graph (`build_vla`)."""
    assert isinstance(part.module, PolicyStep), "a policy's components are its step graphs"
    return part.module


def manifest_policy(manifest: Manifest) -> PolicyProtocol:
    """The policy section of a policy export's manifest (the kind of an export is the section it has)."""
    assert manifest.policy is not None, "a policy export's manifest has its policy section"
    return manifest.policy


KIND = PolicyKind()
