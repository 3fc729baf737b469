"""The Python API in `tpc/__init__.py` mirrors the CLI."""

from __future__ import annotations

from pathlib import Path

import torch

import tpc


def test_prune_export_verify_profile(tmp_path: Path) -> None:
    module = tpc.prune("zoo:tiny-siglip", "hiprune", keep=30, params={"alpha": 0.2})
    with torch.no_grad():
        features, indices = module(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 30, 64) and indices.shape == (2, 30)
    assert bool((indices.diff(dim=-1) > 0).all())
    result = tpc.export("zoo:tiny-siglip", "hiprune", 30, tmp_path / "out", params={"alpha": 0.2})
    assert result.report is not None and result.report.passed
    assert result.manifest.params["alpha"] == 0.2
    assert tpc.verify(tmp_path / "out", samples=2).passed
    assert tpc.profile(tmp_path / "out", runs=3, warmup=1).timing.runs == 3
