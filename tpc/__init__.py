"""tpc, the token-pruning compiler: keep K visual tokens chosen by a published method, export, verify, profile.

The four entry points mirror the CLI. Heavy imports (torch, transformers, onnx) happen on first call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpc.flows import flow  # the flows by name, each imported on its first call

# With the executorch extra installed, transformers imports torchao, which logs a warning for every CUDA
# extension it cannot load on a CPU machine, and torch logs pytree deprecations: noise, not tpc's report.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from torch import nn

    from tpc.exporting import ExportResult
    from tpc.pipeline import PruneRequest
    from tpc.profiling import ProfileReport
    from tpc.verification import VerifyReport

__version__ = "0.1.0"


def _request(
    model: str,
    method: str,
    keep: int | None,
    params: dict[str, Any] | None,
    dtype: str,
    batch: int,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
) -> PruneRequest:
    params = {k: str(v) for k, v in (params or {}).items()}
    return flow("build").PruneRequest(model, method, keep, params, dtype, batch, prompt_len, max_new_tokens)


def prune(
    model: str, method: str, keep: int | None = None, params: dict[str, Any] | None = None, dtype: str = "fp32"
) -> nn.Module:
    """The pruned eager module: `module(pixel_values) -> (kept_features, kept_indices)` for an encoder; for a VLM
    a ModuleDict of its `vision`, `prefill` and `decode` components."""
    return flow("build").build(_request(model, method, keep, params, dtype, 1)).module


def export(
    model: str,
    method: str,
    keep: int | None,
    output: str | Path,
    target: str = "onnx",
    params: dict[str, Any] | None = None,
    dtype: str = "fp32",
    batch: int = 1,
    force: bool = False,
    verify: bool = True,
    prompt_len: int | None = None,
    max_new_tokens: int | None = None,
) -> ExportResult:
    """Export and (by default) verify; raises `tpc.errors.VerificationFailed` on a mismatch.

    A VLM export is run with `tpc.runtimes.VLM.load(output).generate(pixel_values, input_ids)`."""
    request = _request(model, method, keep, params, dtype, batch, prompt_len, max_new_tokens)
    return flow("export").export(request, target, Path(output), force, verify)


def verify(directory: str | Path, samples: int | None = None, inputs: str | Path | None = None) -> VerifyReport:
    """Compare an export, run in its runtime, with the eager pruned model."""
    return flow("verify").verify(Path(directory), samples, Path(inputs) if inputs is not None else None)


def profile(
    directory: str | Path, runs: int = 50, warmup: int = 5, baseline: str | Path | None = None
) -> ProfileReport:
    """Latency of an export in its runtime, side by side with a baseline export if given."""
    return flow("profile").profile(Path(directory), runs, warmup, Path(baseline) if baseline is not None else None)


__all__ = ["__version__", "export", "profile", "prune", "verify"]
