"""Shared fixtures: a private zoo cache per test session, and exports built once and reused."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TPC_CACHE_DIR", tempfile.mkdtemp(prefix="tpc-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN} (the checkout's ../shared/golden)")
    return GOLDEN


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """exported(model, method, keep, **options) -> export directory, built once per distinct request."""
    from tpc.exporting import export
    from tpc.pipeline import PruneRequest

    cache: dict[tuple, Path] = {}

    def make(model: str, method: str, keep: int | None, params: dict | None = None, batch: int = 1) -> Path:
        key = (model, method, keep, tuple(sorted((params or {}).items())), batch)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "out"
            request = PruneRequest(model, method, keep, params or {}, "fp32", batch)
            export(request, "onnx", out, run_verify=False)
            cache[key] = out
        return cache[key]

    return make
