"""Random baseline: a seeded, input-independent choice of K tokens (the control of every evaluation).

The choice is fixed when the model is built (from `seed`), so the exported graph is static and the same
tokens are kept for every image, in eager PyTorch and in every runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from tpc.methods.base import VisionSignals
from tpc.methods.registry import RANDOM


def priority(num_tokens: int, seed: int = 0) -> Tensor:
    """(N,) seeded random priorities (a random permutation as float ranks: no ties).

    Drawn on the host (numpy's PCG64), so tracing records a constant, not a random op.
    """
    permutation = np.random.default_rng(seed).permutation(num_tokens)
    return torch.tensor(permutation.tolist(), dtype=torch.float32)


def _priority_from_signals(signals: VisionSignals, keep: int, params: dict[str, Any]) -> Tensor:
    batch, num_tokens, _ = signals.features.shape
    fixed = priority(num_tokens, params["seed"]).to(signals.features.device)
    return fixed.expand(batch, num_tokens)


METHOD = RANDOM  # declared in tpc.methods.registry; its priority is `_priority_from_signals` above
