"""`--method none`: the unpruned model through the same exporter, the baseline every speedup is measured against."""

from __future__ import annotations

from tpc.methods.registry import NONE

METHOD = NONE  # declared in tpc.methods.registry
