"""The verification report: what `tpc verify` found, as tpc.json's `verification` section and `--json` write it.

Numbers and verdicts only (numpy for the comparisons), so a device without PyTorch reads and writes the same record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    atol_scaled_by_max: bool = False  # atol multiplies max|eager output|


TOLERANCES = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(4e-3, 1e-2, atol_scaled_by_max=True)}


@dataclass
class Diff:
    """`margin`: max over elements of |got - want| / (atol + rtol * |want|), the element that decides; the rule
    passes iff it is <= 1 (a NaN or a shape mismatch is an infinite margin). max_abs / max_rel for reference."""

    max_abs: float
    max_rel: float
    passed: bool
    margin: float = 0.0

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> Diff:
        if np.shape(got) != np.shape(want):
            return cls(math.inf, math.inf, False, math.inf)
        got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
        error = np.abs(got64 - want64)
        atol = tolerance.atol * (float(np.abs(want64).max(initial=1.0)) if tolerance.atol_scaled_by_max else 1.0)
        allowed = np.maximum(atol + tolerance.rtol * np.abs(want64), np.finfo(np.float64).tiny)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = error / allowed
        margin = math.inf if np.isnan(ratio).any() else float(ratio.max(initial=0.0))
        return cls(
            max_abs=float(error.max(initial=0.0)),
            max_rel=float((error / np.maximum(np.abs(want64), 1e-12)).max(initial=0.0)),
            passed=bool(margin <= 1.0),
            margin=margin,
        )

    def worst(self, other: Diff | None) -> Diff:
        if other is None:
            return self
        return Diff(
            max(self.max_abs, other.max_abs),
            max(self.max_rel, other.max_rel),
            self.passed and other.passed,
            max(self.margin, other.margin),
        )


@dataclass
class GenerationCheck:
    """End-to-end greedy generation: exported components vs eager components, token for token."""

    samples: int
    new_tokens: int
    rows_equal: int
    rows: int
    first_difference: list[int] | None = None  # [sample, row, position] of the first differing token
    # a segmentation model: the final hidden state at every [SEG] token fed (prompt or generated), exported vs eager
    seg_hidden: Diff | None = None
    seg_tokens: int = 0  # [SEG] positions compared

    @property
    def passed(self) -> bool:
        return self.rows_equal == self.rows and (self.seg_hidden is None or self.seg_hidden.passed)


@dataclass
class EpisodeCheck:
    """A seeded control episode, exported policy vs eager policy, each carrying its own state step to step."""

    episodes: int
    steps: int  # per episode
    steps_agreeing: int  # same kept indices and the same action tokens
    total_steps: int
    history: Diff | None = None  # the carried history after each step
    first_difference: list[int] | None = None  # [episode, step] of the first disagreeing step

    @property
    def passed(self) -> bool:
        return self.steps_agreeing == self.total_steps and (self.history is None or self.history.passed)


@dataclass
class ShippedCheck:
    """One check of the export's own files: what was checked, whether it held, and what differs if not."""

    check: str
    passed: bool
    detail: str = ""


PASS_RULE = "elementwise |exported - eager| <= atol + rtol * |eager|"


@dataclass
class VerifyReport:
    passed: bool
    runtime: str
    samples: int
    atol: float
    rtol: float
    atol_scaled_by_max: bool
    kept_rows_agreeing: int
    kept_rows: int
    outputs: dict[str, Diff] = field(default_factory=dict)  # over samples whose selection agreed
    teacher_forced: dict[str, Diff] = field(default_factory=dict)
    generation: GenerationCheck | None = None
    episode: EpisodeCheck | None = None
    diagnosis: str = ""
    kept: dict[str, list[int]] = field(default_factory=dict)  # per kept_indices output: [rows agreeing, rows]
    shipped: list[ShippedCheck] = field(default_factory=list)  # the export's own files (check_shipped)
    rule: str = PASS_RULE

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data: a NaN or infinite number becomes the string "nan" / "inf" / "-inf"."""
        data = asdict(self)
        for name in ("generation", "episode"):
            if getattr(self, name) is not None:
                data[name]["passed"] = getattr(self, name).passed
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def skipped_verification(reason: str) -> dict[str, Any]:
    """What tpc.json and `verify --json` record when the runtime cannot run on this machine."""
    return {"passed": None, "skipped": reason}
