"""`--method none`: the unpruned model through the same exporter, the baseline every speedup is measured against."""

from __future__ import annotations

from tpc.methods.base import VisionMethod

METHOD = VisionMethod(
    name="none",
    summary="no pruning: all tokens kept (baseline)",
    reference="-",
    priority=lambda signals, keep, params: signals.features.new_zeros(signals.features.shape[:2]),
    prunes=False,
)
