"""Model pass: a policy's control step as two graphs, its prefill and one decode step, for targets that lower per
stage (ExecuTorch).

The one-graph step unrolls `action_dim - 1` decode steps, so its graph is `action_dim` decoders long. XNNPACK's
partitioner does per-island work proportional to the whole graph: measured on tiny-openvla FastV, the step's
2075 nodes became 163 delegate islands and lowered in 220 s (then `to_executorch` rejected an expanded,
zero-stride tensor). Lowered per stage, the decode graph is written once and called `action_dim - 1` times,
like a VLM's.

    prefill: the step's inputs [+ kept_indices when teacher-forced] -> token (B, 1), present.*,
             [kept_indices (B, K)], [action_attention (B, K)]
    decode:  input_ids (B, 1) + step (1,) + past.* -> token (B, 1), present.*, [action_attention (B, K)]

`action_attention` is the history layer's last attention row over the cached image tokens (slots 1..K), the
row the one-graph step records for VLA-Pruner's action importance. The static cache is `tpc.passes.decoder`'s
(one zero slot per decode step); decode step s writes slot `len_i + s` of layer i at position `prompt + s`, which
is where the one-graph step's growing cache puts it. `tpc.runtimes.staged` drives the two and returns the
step's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tpc.contract.names import (
    ACTION_ATTENTION,
    DECODE,
    HISTORY_INPUT,
    INPUT_IDS,
    KEPT_INDICES,
    PREFILL,
    STEP_INPUT,
    TOKEN,
    cache_names,
)
from tpc.exporter.base import ExportPart
from tpc.passes.decoder import padded_cache
from tpc.passes.policy_step import PolicyStep


class StepPrefill(nn.Module):
    """The step up to its first action token; see the module docstring for its interface."""

    def __init__(self, step: PolicyStep, teacher_forced: bool = False) -> None:
        super().__init__()
        self.step = step
        self.input_names = step.input_names + ((KEPT_INDICES,) if teacher_forced else ())
        self.output_names: tuple[str, ...] = (TOKEN, *cache_names("present", step.num_layers))
        if step.method is not None:
            self.output_names += (KEPT_INDICES,)
        if step.history_tap is not None:
            self.output_names += (ACTION_ATTENTION,)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.input_names, args, strict=True))
        step = self.step
        if step.history_tap is not None:
            step.history_tap.rows = []
        hidden, cache, kept = step.prefill(
            named["pixel_values"], named["input_ids"], named.get(HISTORY_INPUT), named.get(KEPT_INDICES)
        )
        logits = step.decoder.logits(hidden)
        outputs = (logits.argmax(dim=-1, keepdim=True), *padded_cache(cache, step.layout.decode_steps))
        if kept is not None:
            outputs += (kept,)
        if step.history_tap is not None:
            outputs += (step.history_tap.rows[0][:, 1 : 1 + step.keep],)
        return outputs


class StepDecode(nn.Module):
    """One greedy decode step of the policy on the static cache; see the module docstring for its interface."""

    def __init__(self, step: PolicyStep) -> None:
        super().__init__()
        self.decoder = step.decoder  # the step's own layout: original positions, the prefill saw every token
        self.history_tap = step.history_tap
        self.image_slots = step.keep  # every image token when the step does not prune
        self.input_names = (INPUT_IDS, STEP_INPUT, *cache_names("past", step.num_layers))
        self.output_names: tuple[str, ...] = (TOKEN, *cache_names("present", step.num_layers))
        if self.history_tap is not None:
            self.output_names += (ACTION_ATTENTION,)

    def forward(self, input_ids: Tensor, step: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        if self.history_tap is not None:
            self.history_tap.rows = []
        hidden, present = self.decoder.decode_static(input_ids, step, past)
        outputs = (self.decoder.logits(hidden).argmax(dim=-1, keepdim=True), *present)
        if self.history_tap is not None:
            outputs += (self.history_tap.rows[0][:, 1 : 1 + self.image_slots],)
        return outputs


@dataclass
class StagePart:
    """One stage as exported: the part to lower, and its eager example outputs (the stage's samples)."""

    part: ExportPart
    expected: dict[str, Tensor]


def prefill_stage(step: PolicyStep, inputs: dict[str, Tensor], kept_indices: Tensor | None = None) -> StagePart:
    """The step's prefill as a part to export, with its eager outputs. `kept_indices`: teacher-force it with them
    (an extra input)."""
    prefill = StepPrefill(step, teacher_forced=kept_indices is not None).eval()
    prefill_inputs = dict(inputs) if kept_indices is None else {**inputs, KEPT_INDICES: kept_indices}
    return StagePart(ExportPart(prefill, prefill_inputs, prefill.output_names), _run(prefill, prefill_inputs))


def policy_stages(step: PolicyStep, inputs: dict[str, Tensor]) -> dict[str, StagePart]:
    """The step's prefill and decode as parts to export; decode's example inputs are the prefill's first token
    and cache."""
    prefill = prefill_stage(step, inputs)
    decode = StepDecode(step).eval()
    past_names, present_names = cache_names("past", step.num_layers), cache_names("present", step.num_layers)
    past = {past: prefill.expected[present] for past, present in zip(past_names, present_names, strict=True)}
    decode_inputs: dict[str, Tensor] = {
        INPUT_IDS: prefill.expected[TOKEN],
        STEP_INPUT: torch.zeros(1, dtype=torch.int64),
        **past,
    }
    return {
        PREFILL: prefill,
        DECODE: StagePart(ExportPart(decode, decode_inputs, decode.output_names), _run(decode, decode_inputs)),
    }


def _run(module: StepPrefill | StepDecode, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    with torch.no_grad():
        outputs = module(*inputs.values())
    return dict(zip(module.output_names, outputs, strict=True))
