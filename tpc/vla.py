"""Planning and building an OpenVLA-style policy export: one static graph per control step, state as tensors.

The unpruned policy and FastV are stateless: one graph, `step`. VLA-Pruner carries the history of action
attention between steps and does not prune until it holds `window` vectors (the reference's warm-up), so it
exports two graphs of the same interface: `warmup` (every image token kept) and `pruned` (K kept, guided by
the history); the runtime picks one per step (`tpc.runtimes.policy`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpc.contract.names import PRUNED, STEP, WARMUP
from tpc.errors import UsageError
from tpc.methods import PrefillMethod, get_method
from tpc.models_zoo import ModelSource, OpenVlaAdapter
from tpc.models_zoo.openvla import EMPTY_TOKEN_ID, PROMPT_TEMPLATE, TOWER_NORMALIZATION, PolicyGeometry, action_stats
from tpc.passes.policy_step import PolicyStep, StepLayout
from tpc.pipeline import (
    DTYPES,
    Component,
    DecoderPlan,
    Pruned,
    PruneRequest,
    check_budget,
    check_method_layers,
    check_positions,
    eager_outputs,
    methods_for,
    resolve_keep,
)
from tpc.runtimes.policy import Policy, preprocess


@dataclass(frozen=True)
class VlaPlan(DecoderPlan):
    """A validated policy request: method, budget, the static prompt, the action head."""

    unnorm_key: str | None

    @property
    def geometry(self) -> PolicyGeometry:
        return self.adapter.policy(self.source.config, self.unnorm_key)

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

    @property
    def layout(self) -> StepLayout:
        return StepLayout(self.prompt.text_len, self.prompt.image_tokens, self.geometry.action_dim)

    def kept_lengths(self, keep: int) -> list[int]:
        """Each decoder layer's prompt length when `keep` image tokens are kept from the prune layer on."""
        prunes = isinstance(self.method, PrefillMethod) and keep != self.prompt.image_tokens
        prune_layer = self.method.prune_layer(self.method_params) if prunes else None
        return list(self.layout.cache_lengths(keep, prune_layer, self.decoder.num_layers))

    def flops(self, keep: int | None = None) -> dict[str, int]:
        """2x multiply-adds of one control step with `keep` image tokens kept (default: the plan's K)."""
        geometry, decoder = self.geometry, self.decoder
        lengths = self.kept_lengths(self.keep if keep is None else keep)
        vision = sum(spec.hidden_size for spec in geometry.towers)
        d, n = decoder.hidden_size, geometry.image_tokens
        projector = 2 * n * (vision * 4 * vision + 4 * vision * d + d * d)
        prefill = decoder.head_flops(1) + sum(decoder.layer_flops(length, (length + 1) // 2) for length in lengths)
        decode = sum(
            decoder.head_flops(1) + sum(decoder.layer_flops(1, length + step) for length in lengths)
            for step in range(1, geometry.action_dim)
        )
        towers = geometry.tower_flops()
        return {"towers": towers, "projector": projector, "prefill": prefill, "decode": decode,
                "step": towers + projector + prefill + decode}  # fmt: skip

    def policy(self) -> dict[str, Any]:
        """What a runtime needs to drive the graphs and carry the state (written to tpc.json as `policy`)."""
        geometry, prompt = self.geometry, self.prompt
        window = self.method_params.get("window", 0)
        state: dict[str, Any] = {}
        if self.stateful:
            state = {
                "history": {"shape": [window, prompt.image_tokens], "dtype": "float32", "initial": "zeros",
                            "input": "history", "output": "history_next", "order": "oldest first"},
                "history_len": {"initial": 0, "max": window, "update": "min(history_len + 1, window)"},
            }  # fmt: skip
            graphs = {WARMUP: "while history_len < window (every image token kept)", PRUNED: "once it is full"}
            protocol = (
                "reset: history = zeros, history_len = 0. step(image, prompt ids): graph = warmup if history_len < "
                "window else pruned; outputs = graph(pixel_values, input_ids, history); history = history_next; "
                "history_len = min(history_len + 1, window); action = decode(action_tokens)"
            )
        else:
            graphs = {STEP: "every step"}
            protocol = "step(image, prompt ids): action_tokens = step(pixel_values, input_ids); decode them"
        return {
            "action_dim": geometry.action_dim,
            "n_action_bins": geometry.n_action_bins,
            "action_vocab_size": geometry.action_vocab_size,
            "unnorm_key": self.unnorm_key,
            "action_stats": action_stats(self.source.config, self.unnorm_key),
            "image": {
                "size": geometry.image_size,
                "normalization": [{"tower": s.family, **TOWER_NORMALIZATION[s.family]} for s in geometry.towers],
            },
            "prompt": {
                "text_tokens": prompt.text_len,
                "image_start": prompt.image_start,
                "image_tokens": prompt.image_tokens,
                "length": prompt.length,
                "template": PROMPT_TEMPLATE,
                "empty_token_id": EMPTY_TOKEN_ID,
            },
            "kept_image_tokens": self.keep,
            "decoder_lengths": {"pruned": self.kept_lengths(self.keep), "full": self.kept_lengths(prompt.image_tokens)},
            "state": state,
            "graphs": graphs,
            "protocol": protocol,
        }


def plan_vla(request: PruneRequest, source: ModelSource) -> VlaPlan:
    adapter: OpenVlaAdapter = source.adapter
    config = source.config
    method = get_method(request.method)
    if not adapter.accepts(method):
        raise UsageError(
            f"method '{method.name}' does not apply to {adapter.family} policies (their towers are not pruned); "
            f"methods for {adapter.family}: {', '.join(methods_for(adapter))}"
        )
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

    def step(method: PrefillMethod | None, keep: int, history_layer: int | None) -> Component:
        model = adapter.load(source.path).to(dtype)
        module = PolicyStep(model, adapter, plan.layout, method, keep, plan.method_params, history_layer).eval()
        return Component("", module, module.input_names, module.output_names)

    everything = plan.prompt.image_tokens
    if plan.stateful:
        history_layer = plan.method_params["history_layer"]
        parts = {WARMUP: step(None, everything, history_layer), PRUNED: step(plan.method, plan.keep, history_layer)}
    else:
        parts = {STEP: step(plan.method if plan.method.prunes else None, plan.keep, None)}
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
    samples = {
        WARMUP: {**first, "history": np.zeros(policy["state"]["history"]["shape"], dtype=np.float32)},
        PRUNED: {"pixel_values": preprocess(frames[window], policy), "input_ids": ids, "history": runner.history},
    }
    return {name: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()} for name, s in samples.items()}


plan = plan_vla  # the kind's entry points, as tpc.pipeline.DECODER_KINDS calls them
build = build_vla
