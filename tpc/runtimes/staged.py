"""A policy step exported as two methods (prefill, decode; `tpc.passes.policy_stages`) run as the one step.

`StagedStep.run` takes the step's inputs and returns the step's outputs, so `Policy`, verification and
profiling drive a staged export exactly like a one-graph one. What the one-graph step computes after its
decode loop is done here with numpy, as `tpc.json`'s `policy.stages` spells out for other languages: the
action tokens side by side; VLA-Pruner's action importance as the mean of the recorded `action_attention`
rows, scattered onto the image grid at the kept indices (zeros elsewhere); the history shifted by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tpc.contract.names import ACTION_ATTENTION, KEPT_INDICES, TOKEN, Session

if TYPE_CHECKING:
    from tpc.contract.manifest import ComponentSpec

STAGES_PROTOCOL = (
    "each graph G is two methods: G_prefill(G's inputs) -> token, present.*, [kept_indices], [action_attention]; "
    "then for s in 0..action_dim-2: G_decode(input_ids=token, step=[s], past.*=present.*) -> token, present.*, "
    "[action_attention]. action_tokens = the action_dim tokens in order; action_importance = mean of the "
    "action_attention rows, placed at kept_indices of a zero (1, image_tokens) row (every index when G keeps all); "
    "history_next = history[1:] followed by action_importance"
)


class StagedStep:
    """Runs a staged component's `prefill` once and its `decode` `action_dim - 1` times (`spec`: the component's
    manifest ComponentSpec, whose inputs and outputs are the step's)."""

    def __init__(self, prefill: Session, decode: Session, spec: ComponentSpec) -> None:
        self.prefill, self.decode = prefill, decode
        outputs = {s.name: s for s in spec.outputs}
        self.output_names = [s.name for s in spec.outputs]
        self.decode_calls = outputs["action_tokens"].shape[1] - 1
        self.image_tokens = outputs["action_importance"].shape[1] if "action_importance" in outputs else None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = self.prefill.run(inputs)
        past = as_past(first)
        tokens, rows = [first[TOKEN]], [first[ACTION_ATTENTION]] if ACTION_ATTENTION in first else []
        for step in range(self.decode_calls):
            out = self.decode.run({"input_ids": tokens[-1], "step": np.array([step], dtype=np.int64), **past})
            past = as_past(out)
            tokens.append(out[TOKEN])
            if rows:
                rows.append(out[ACTION_ATTENTION])
        outputs = {"action_tokens": np.concatenate(tokens, axis=1)}
        if KEPT_INDICES in first:
            outputs[KEPT_INDICES] = first[KEPT_INDICES]
        if rows:
            importance = self._importance(np.stack(rows).mean(axis=0, dtype=np.float32), first.get(KEPT_INDICES))
            outputs["action_importance"] = importance
            outputs["history_next"] = np.concatenate([inputs["history"][1:], importance[:1]], axis=0)
        return {name: outputs[name] for name in self.output_names}

    def _importance(self, per_token: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
        if kept is None:
            return per_token
        assert self.image_tokens is not None, "a step that keeps indices outputs action_importance over every token"
        importance = np.zeros((per_token.shape[0], self.image_tokens), dtype=per_token.dtype)
        np.put_along_axis(importance, kept, per_token, axis=1)
        return importance


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stage's `present.*` outputs as the next decode call's `past.*` inputs."""
    return {f"past.{name[len('present.') :]}": value for name, value in outputs.items() if name.startswith("present.")}
