"""The select rule written independently of the op, in plain numpy: what every lowering is tested against (the
eager op, ONNX Runtime, ExecuTorch, Core ML's composite, the fused CUDA kernel of `plugins_cuda/`)."""

from __future__ import annotations

import numpy as np


def kept_indices_reference(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (B, k) int64 kept indices, ascending: NaN lowest, then value descending, then index
    ascending, by a stable sort."""
    out = []
    for row in np.asarray(scores, dtype=np.float64):
        order = sorted(
            range(len(row)),
            key=lambda i: (0 if np.isnan(row[i]) else 1, -np.inf if np.isnan(row[i]) else row[i], -i),
            reverse=True,
        )
        out.append(sorted(order[:k]))
    return np.array(out, dtype=np.int64).reshape(len(scores), k)


def token_select_reference(scores: np.ndarray, tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) scores, (B, N, D) tokens -> kept indices (B, k) int64 ascending, kept tokens (B, k, D)."""
    indices = kept_indices_reference(scores, k)
    return indices, np.take_along_axis(tokens, indices[:, :, None], axis=1)
