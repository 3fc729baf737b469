"""`tpc eval`'s report: typed records, written as JSON (schema `tpc-eval/1`, checked with jsonschema)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCHEMA = "tpc-eval/1"
MAX_DISAGREEMENT = 0.001  # exported predictions may differ from eager on at most 0.1 % of the images


@dataclass(frozen=True)
class Accuracy:
    accuracy: float  # top-1 over the images
    correct: int
    images: int
    retention: float | None = None  # accuracy / the unpruned model's (None: this is the unpruned model)


@dataclass(frozen=True)
class Disagreement:
    """One image where the exported model's answer is not eager's, with both margins (best minus runner-up score):
    a small one is a near-tie that float rounding in another runtime may flip."""

    index: int
    label: int
    eager: int
    exported: int
    eager_margin: float
    exported_margin: float
    near_tie: bool


@dataclass(frozen=True)
class Exported:
    target: str
    accuracy: Accuracy
    agreement: float  # share of images whose exported answer equals eager's
    disagreements: list[Disagreement]
    within_tolerance: bool  # disagreements <= MAX_DISAGREEMENT of the images


@dataclass(frozen=True)
class Spread:
    """The random baseline over seeds: mean and sample standard deviation of the accuracies."""

    mean: float
    std: float
    seeds: list[int]
    accuracies: list[float]
    retention: float


@dataclass(frozen=True)
class KeepResult:
    keep: int
    share: float  # keep / the tokens the method chooses among
    baseline_keep: int  # the baselines' budget per image (keep, or its share per image of an n-shot prompt)
    eager: Accuracy
    random: Spread
    uniform: Accuracy
    exported: Exported | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    split: str
    images: int
    classes: list[str]
    fingerprint: str
    resized: bool


@dataclass(frozen=True)
class EvalReport:
    model: str
    dataset: DatasetInfo
    method: str
    params: dict[str, str]
    tokens: int  # the visual tokens per image the methods choose among
    unpruned: Accuracy
    keeps: list[KeepResult]
    target: str | None
    batch_size: int
    seconds: float
    cached_runs: int  # eager runs read from the cache instead of computed
    computed_runs: int
    schema: str = SCHEMA

    @property
    def drifted(self) -> list[KeepResult]:
        """Budgets whose export disagrees with eager on more than MAX_DISAGREEMENT of the images."""
        return [k for k in self.keeps if k.exported is not None and not k.exported.within_tolerance]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        validate(data)
        return data


_ACCURACY = {
    "type": "object",
    "required": ["accuracy", "correct", "images"],
    "properties": {
        "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
        "correct": {"type": "integer", "minimum": 0},
        "images": {"type": "integer", "minimum": 1},
        "retention": {"type": ["number", "null"], "minimum": 0},
    },
}
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "model", "dataset", "method", "tokens", "unpruned", "keeps", "target"],
    "properties": {
        "schema": {"const": SCHEMA},
        "model": {"type": "string"},
        "method": {"type": "string"},
        "tokens": {"type": "integer", "minimum": 1},
        "target": {"type": ["string", "null"]},
        "unpruned": _ACCURACY,
        "dataset": {
            "type": "object",
            "required": ["name", "split", "images", "classes", "fingerprint"],
            "properties": {"images": {"type": "integer", "minimum": 1}, "classes": {"type": "array"}},
        },
        "keeps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["keep", "share", "eager", "random", "uniform", "exported"],
                "properties": {
                    "keep": {"type": "integer", "minimum": 1},
                    "eager": _ACCURACY,
                    "uniform": _ACCURACY,
                    "random": {
                        "type": "object",
                        "required": ["mean", "std", "seeds", "accuracies"],
                        "properties": {"seeds": {"type": "array", "minItems": 1}},
                    },
                    "exported": {
                        "oneOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "required": ["target", "accuracy", "agreement", "disagreements", "within_tolerance"],
                                "properties": {"accuracy": _ACCURACY, "agreement": {"type": "number"}},
                            },
                        ]
                    },
                },
            },
        },
    },
}


def validate(data: dict[str, Any]) -> None:
    """Raise jsonschema's ValidationError when `data` is not a `tpc-eval/1` report."""
    import jsonschema

    jsonschema.validate(data, JSON_SCHEMA)
