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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError
from tpc.runtimes.base import KEPT_INDICES, load_components

RunComponent = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
WARMUP, PRUNED, STEP = "warmup", "pruned", "step"


def preprocess(image: np.ndarray, policy: dict[str, Any]) -> np.ndarray:
    """(H, W, 3) uint8 RGB at the policy's resolution -> (1, 6, H, W) float32: each tower's normalisation."""
    size = policy["image"]["size"]
    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise UsageError(
            f"image must be a ({size}, {size}, 3) uint8 RGB array (resize it to the policy's resolution first), "
            f"got {image.dtype}{list(image.shape)}"
        )
    scaled = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    planes = []
    for stats in policy["image"]["normalization"]:
        mean = np.asarray(stats["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(stats["std"], dtype=np.float32)[:, None, None]
        planes.append((scaled - mean) / std)
    return np.concatenate(planes, axis=0)[None].astype(np.float32)


def actions_from_tokens(tokens: np.ndarray, policy: dict[str, Any]) -> np.ndarray:
    """(action_dim,) token ids -> (action_dim,) un-normalised actions (the release's `predict_action` tail)."""
    bins = np.linspace(-1, 1, policy["n_action_bins"])
    centers = (bins[:-1] + bins[1:]) / 2.0
    discretized = np.clip(policy["action_vocab_size"] - np.asarray(tokens) - 1, 0, centers.shape[0] - 1)
    normalized = centers[discretized]
    stats = policy["action_stats"]
    mask = np.asarray(stats.get("mask", np.ones(len(stats["q01"]), dtype=bool)), dtype=bool)
    high, low = np.asarray(stats["q99"]), np.asarray(stats["q01"])
    return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


def prompt_ids(instruction: np.ndarray | list[int], policy: dict[str, Any]) -> np.ndarray:
    """Token ids of the prompt (BOS first) -> (1, T) int64, checked against the export's static length."""
    ids = np.asarray(instruction, dtype=np.int64).reshape(1, -1)
    expected = policy["prompt"]["text_tokens"]
    if ids.shape[1] != expected:
        raise UsageError(
            f"the prompt has {ids.shape[1]} tokens; this export takes {expected} (BOS + "
            f"'{policy['prompt']['template']}' tokenized; re-export with --prompt-len {ids.shape[1]})"
        )
    return ids


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

    def __init__(self, components: Mapping[str, RunComponent], policy: dict[str, Any]) -> None:
        self.components = components
        self.policy = policy
        self.stateful = WARMUP in components
        self.reset()

    @classmethod
    def load(cls, directory: str | Path) -> Policy:
        manifest, runs = load_components(directory, "policy", "a policy")
        return cls(runs, manifest.policy)

    @property
    def window(self) -> int:
        return self.policy["state"]["history"]["shape"][0] if self.stateful else 0

    def reset(self) -> None:
        """Episode start: forget the history (the next `window` steps are warm-up steps)."""
        shape = self.policy["state"]["history"]["shape"] if self.stateful else (0,)
        self.history = np.zeros(shape, dtype=np.float32)
        self.history_len = 0

    def step(self, image: np.ndarray, instruction: np.ndarray | list[int]) -> np.ndarray:
        """One control step: an (H, W, 3) uint8 image (or (1, 6, H, W) pixel values) and the prompt ids -> action."""
        return self.step_result(image, instruction).action

    def step_result(self, image: np.ndarray, instruction: np.ndarray | list[int]) -> StepResult:
        pixels = image if image.dtype == np.float32 and image.ndim == 4 else preprocess(image, self.policy)
        inputs = {"pixel_values": pixels, "input_ids": prompt_ids(instruction, self.policy)}
        if not self.stateful:
            graph = STEP
        else:
            graph = WARMUP if self.history_len < self.window else PRUNED
            inputs["history"] = self.history
        out = self.components[graph](inputs)
        tokens = out["action_tokens"][0]
        kept = out[KEPT_INDICES][0] if KEPT_INDICES in out else np.arange(self.policy["prompt"]["image_tokens"])
        if self.stateful:
            self.history = out["history_next"].astype(np.float32)
            self.history_len = min(self.history_len + 1, self.window)
        history = self.history.copy() if self.stateful else None
        return StepResult(actions_from_tokens(tokens, self.policy), tokens, kept, graph, history)
