"""A policy export driven step by step, with numpy only: `Policy.load(DIR)`, `.reset()`, `.step(image, instruction)`.

The graphs are stateless; the policy's state is two values this class carries between steps, as `tpc.json`
(`policy.state`, `policy.protocol`) documents for any runtime in any language:
    history      float32 (window, N): the last `window` action-importance vectors, oldest first (zeros at reset)
    history_len  how many of them are real (0 at reset, at most `window`)
While `history_len < window` a step runs the `warmup` graph (every image token kept, as the reference does);
then the `pruned` graph, whose guide comes from `history`. Each step feeds `history_next` back as `history`.
A stateless export (the unpruned policy, FastV) has one graph, `step`.

Actions are decoded as the OpenVLA release does: token id t is bin `action_vocab_size - t - 1` (clipped), whose
centre in [-1, 1] is un-normalised with the dataset's q01/q99 where the mask says so.

`step` takes numpy arrays or torch tensors (`tpc.runtimes.inputs`): the camera image as (H, W, 3) uint8 RGB, or
pixel values already normalised, (1, 3 * towers, H, W) of any float dtype; the prompt ids as (T,) or (1, T)
integers inside the vocabulary (`action_vocab_size` in tpc.json: the vocabulary without its padding, which a
tokenizer never produces).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpc.contract.names import KEPT_INDICES, PRUNED, STEP, WARMUP
from tpc.contract.protocols import HistorySpec, PolicyProtocol
from tpc.errors import UsageError
from tpc.runtimes.base import RunComponent, load_export
from tpc.runtimes.inputs import check_floats, check_ids, describe, resolve_strict, shape_text, to_numpy


def preprocess(image: Any, policy: PolicyProtocol) -> np.ndarray:
    """(H, W, 3) uint8 RGB at the policy's resolution -> (1, 6, H, W) float32: each tower's normalisation."""
    size = policy.image.size
    image = to_numpy(image, "image")
    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise UsageError(
            f"image must be a ({size}, {size}, 3) uint8 RGB array (resize it to the policy's resolution first), or "
            f"pixel values {shape_text(pixel_shape(policy))} of any float dtype normalised as tpc.json "
            f"policy.image says; got {describe(image)}"
        )
    scaled = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    planes = []
    for stats in policy.image.normalization:
        mean = np.asarray(stats.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(stats.std, dtype=np.float32)[:, None, None]
        planes.append((scaled - mean) / std)
    return np.concatenate(planes, axis=0)[None].astype(np.float32)


def pixel_shape(policy: PolicyProtocol) -> tuple[int, int, int, int]:
    """The step graphs' `pixel_values` shape: (1, 3 per tower, size, size)."""
    size = policy.image.size
    return (1, 3 * len(policy.image.normalization), size, size)


def actions_from_tokens(tokens: np.ndarray, policy: PolicyProtocol) -> np.ndarray:
    """(action_dim,) token ids -> (action_dim,) un-normalised actions (the release's `predict_action` tail)."""
    bins = np.linspace(-1, 1, policy.n_action_bins)
    centers = (bins[:-1] + bins[1:]) / 2.0
    discretized = np.clip(policy.action_vocab_size - np.asarray(tokens) - 1, 0, centers.shape[0] - 1)
    normalized = centers[discretized]
    stats = policy.action_stats
    if stats is None:
        raise UsageError("tpc.json policy.action_stats is null: actions cannot be un-normalised (re-export it)")
    mask = np.asarray(stats.get("mask", np.ones(len(stats["q01"]), dtype=bool)), dtype=bool)
    high, low = np.asarray(stats["q99"]), np.asarray(stats["q01"])
    return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


def prompt_ids(instruction: Any, policy: PolicyProtocol) -> np.ndarray:
    """Token ids of the prompt (BOS first), (T,) or (1, T) -> (1, T) int64, checked against the export's static
    length and the vocabulary."""
    prompt = policy.prompt
    text, total, image = prompt.text_tokens, prompt.length, prompt.image_tokens
    template = prompt.template.replace("\n", "\\n")  # one line
    ids = to_numpy(instruction, "the prompt")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim == 2 and ids.shape[0] == 1 and ids.shape[1] != text:
        got = ids.shape[1]
        if got == total:
            fix = (
                f"you passed the whole decoder sequence; pass only the {text} text ids (BOS + the tokenized "
                f"prompt): the graph inserts the {image} image tokens after BOS itself"
            )
        else:
            fix = (
                f"tokenize '{template}' with the model's tokenizer (BOS first) to {text} ids, or re-export "
                f"with --prompt-len {got} to take {got} text tokens"
            )
        raise UsageError(
            f"the prompt has {got} tokens; this export takes {text} text tokens (BOS + the instruction prompt), "
            f"which with the {image} image tokens make its {total}-token decoder prompt: {fix}"
        )
    # the vocabulary without its padding rows: every id a tokenizer produces lies below it
    size, source = int(policy.action_vocab_size), "tpc.json policy.action_vocab_size"
    layout = f"1, {text} text tokens: BOS + '{template}' tokenized"
    return check_ids(ids, "the prompt", (1, text), layout, size, source)


@dataclass
class StepResult:
    """What one control step produced (the action, and what a verifier or a log wants to see)."""

    action: np.ndarray
    tokens: np.ndarray  # (action_dim,) int64
    kept_indices: np.ndarray  # (K,) image tokens the decoder kept (all of them in warm-up and unpruned steps)
    graph: str  # which graph ran
    history: np.ndarray | None  # the history after this step (stateful exports)


class Policy:
    """An exported policy and its state. `components`: graph name -> callable (a runtime session's `run`, or the
    eager module's, which is how verification compares the two with the same loop)."""

    def __init__(self, components: Mapping[str, RunComponent], policy: PolicyProtocol, strict: bool = False) -> None:
        self.components = components
        self.policy = policy
        self.stateful = WARMUP in components
        self.strict = strict
        self.reset()

    @classmethod
    def load(cls, directory: str | Path, strict: bool = False) -> Policy:
        """Open the export's step graphs in its target's runtime. `strict`: NaN/inf pixel values raise a
        UsageError instead of a `NonFiniteInputWarning`."""
        manifest, runs = load_export(directory, "policy")
        assert manifest.policy is not None, "a policy export's manifest has its policy section (load_export checks it)"
        return cls(runs, manifest.policy, strict)

    @property
    def history_spec(self) -> HistorySpec | None:
        """The carried history's layout (a stateful export), or None."""
        state = self.policy.state
        return state.history if self.stateful and state is not None else None

    @property
    def window(self) -> int:
        history = self.history_spec
        return history.shape[0] if history is not None else 0

    def reset(self) -> None:
        """Episode start: forget the history (the next `window` steps are warm-up steps)."""
        history = self.history_spec
        shape = history.shape if history is not None else (0,)
        self.history = np.zeros(shape, dtype=np.float32)
        self.history_len = 0

    def step(self, image: Any, instruction: Any, strict: bool | None = None) -> np.ndarray:
        """One control step: an (H, W, 3) uint8 image (or (1, 6, H, W) float pixel values) and the prompt ids
        (numpy or torch) -> the action. `strict`: NaN/inf pixel values raise (default: the policy's `strict`)."""
        return self.step_result(image, instruction, strict).action

    def pixels(self, image: Any, strict: bool | None = None) -> np.ndarray:
        """The step graphs' `pixel_values` for a camera image (uint8, preprocessed here) or for pixel values."""
        image = to_numpy(image, "image")
        if image.ndim != 4:
            return preprocess(image, self.policy)
        layout = "1, 3 channels per vision tower, height, width: each tower's normalisation, as tpc.json policy.image"
        return check_floats(
            image, "pixel_values", pixel_shape(self.policy), "float32", layout, resolve_strict(strict, self.strict), 4
        )

    def step_result(self, image: Any, instruction: Any, strict: bool | None = None) -> StepResult:
        pixels = self.pixels(image, strict)
        inputs = {"pixel_values": pixels, "input_ids": prompt_ids(instruction, self.policy)}
        if not self.stateful:
            graph = STEP
        else:
            graph = WARMUP if self.history_len < self.window else PRUNED
            inputs["history"] = self.history
        out = self.components[graph](inputs)
        tokens = out["action_tokens"][0]
        kept = out[KEPT_INDICES][0] if KEPT_INDICES in out else np.arange(self.policy.prompt.image_tokens)
        if self.stateful:
            self.history = out["history_next"].astype(np.float32)
            self.history_len = min(self.history_len + 1, self.window)
        history = self.history.copy() if self.stateful else None
        return StepResult(actions_from_tokens(tokens, self.policy), tokens, kept, graph, history)
