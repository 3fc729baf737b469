"""Uniform baseline: every floor(N/K)-th token in raster order, S[i] = i * floor(N/K) (LVLM_CSP's sampler)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tpc.methods.base import VisionSignals
from tpc.methods.registry import UNIFORM


def indices(num_tokens: int, keep: int) -> Tensor:
    """(keep,) the raster-stride positions i * floor(N / keep)."""
    if not 1 <= keep <= num_tokens:
        raise ValueError(f"keep must be in [1, {num_tokens}], got {keep}")
    return torch.arange(keep) * (num_tokens // keep)


def priority(num_tokens: int, keep: int) -> Tensor:
    """(N,) 1.0 at the stride positions, 0.0 elsewhere."""
    return torch.zeros(num_tokens).index_fill(0, indices(num_tokens, keep), 1.0)


def _priority_from_signals(signals: VisionSignals, keep: int, params: dict[str, Any]) -> Tensor:
    batch, num_tokens, _ = signals.features.shape
    return priority(num_tokens, keep).to(signals.features.device).expand(batch, num_tokens)


METHOD = UNIFORM  # declared in tpc.methods.registry; its priority is `_priority_from_signals` above
