"""The profile report: typed records, and the versioned JSON Schema every `tpc profile --json` file validates against.

One schema for every source of timings: a local run in any runtime, an ETDump recorded on a phone (`--etdump`),
a TensorRT engine run on a Jetson. A figure never travels without its sample count, and a report names the machine,
the runtimes' versions and the export it measured, so two reports can be compared without asking how they were made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tpc.contract.names import STAGES
from tpc.profiling.stages import StageBreakdown
from tpc.profiling.stats import Noise, Ratio, Summary

REPORT_FORMAT = "tpc-profile/1"


@dataclass(frozen=True)
class Machine:
    platform: str  # OS and kernel
    cpu: str
    cores: int | None  # None: not known (a profile recorded on a device)
    memory_gib: float | None
    gpu: str | None
    python: str
    versions: dict[str, str]  # tpc, numpy and the runtime's packages


@dataclass(frozen=True)
class ColdStart:
    """Measured in a fresh process, so nothing is cached yet: importing the runtime's package, creating a session
    (or loading a program) for every component, the first call of the headline; the peak resident memory the
    export adds to the process (after import, before load -> the highest point over a few runs)."""

    import_ms: float
    load_ms: float
    first_run_ms: float
    peak_rss_mib: float
    processes: int = 1  # fresh processes measured; each figure is their median


@dataclass(frozen=True)
class Deadline:
    """A control step against its period at `--rate`: how often and by how much it overran, and the rate its p99
    sustains."""

    rate_hz: float
    deadline_ms: float
    misses: int
    share: float
    worst_overrun_ms: float
    sustained_hz: float


@dataclass(frozen=True)
class Ideal:
    """Why a speedup is what it is: the FLOPs ideal (every stage at one rate), the calibrated ideal (each stage at
    the FLOP rate measured for it in the baseline) and how much of the measured latency pruning cannot touch."""

    flops_ideal: float
    calibrated_ideal: float
    reached: float  # measured p50 speedup / calibrated ideal
    untouchable_share: float
    basis: str  # "operators" (per-stage times from a runtime profile) or "components" (whole graphs)
    stage_rates_gflops: dict[str, float]
    fixed_overhead_ms: float | None


@dataclass
class ExportProfile:
    directory: str
    runtime: str
    kind: str  # encoder | vlm | vla
    export: dict[str, Any]  # the manifest's summary: model, method, keep, target, dtype, tokens, batch
    headline: str  # what one call of the whole export is: "model", "time to first token", "control step"
    headline_components: list[str]  # the graphs whose summed time per round is that headline
    timing: Summary
    samples_ms: list[float]
    components: dict[str, Summary]
    component_samples_ms: dict[str, list[float]]
    throughput_per_s: float  # batch items per second at the mean headline latency
    artifact_bytes: int
    threads: int | None  # the process's threads after the runs (the runtime's pools included); None: not known
    noise: Noise
    cold: ColdStart | None = None
    cold_unavailable: str | None = None
    generation: Summary | None = None  # a VLM's whole greedy generation of `generation_tokens` tokens
    generation_tokens: int | None = None
    deadlines: dict[str, Deadline] = field(default_factory=dict)  # a policy's graphs at --rate
    operators: dict[str, StageBreakdown] = field(default_factory=dict)  # per component, from the runtime's profiler
    operators_unavailable: str | None = None
    overhead_ms: dict[str, float] = field(default_factory=dict)  # an empty graph of each component's I/O


@dataclass(frozen=True)
class Comparison:
    ratios: list[Ratio]  # the headline's, baseline / export at each percentile
    components: dict[str, list[Ratio]]
    verdict: str
    measurable: bool
    ideal: Ideal | None
    ideal_unavailable: str | None


@dataclass(frozen=True)
class Settings:
    runs: int  # rounds timed (each round: one call of each component of each export)
    warmup: int
    auto: bool
    stopped_by: str  # "runs", "precision" or "time cap"
    precision: float
    confidence: float
    order: str


@dataclass
class ProfileReport:
    machine: Machine
    settings: Settings
    export: ExportProfile
    baseline: ExportProfile | None = None
    comparison: Comparison | None = None
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    format: str = REPORT_FORMAT

    @property
    def timing(self) -> Summary:
        """The export's headline distribution (`tpc.profile(...).timing`, as the Python API has always had it)."""
        return self.export.timing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


_NUMBER, _INT, _STRING = {"type": "number"}, {"type": "integer", "minimum": 0}, {"type": "string"}
_MS = {"type": "number", "minimum": 0}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_SUMMARY = _object(
    {
        "runs": {"type": "integer", "minimum": 1},
        **{name: _MS for name in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "std_ms")},
        "tail_samples": {"type": "integer", "minimum": 1},
    }
)
_RATIO = _object(
    {
        "percentile": {"enum": [50, 90, 99]},
        "ratio": {"type": "number", "exclusiveMinimum": 0},
        "low": {"type": "number", "exclusiveMinimum": 0},
        "high": {"type": "number", "exclusiveMinimum": 0},
        "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    }
)
_SAMPLES = {"type": "array", "items": _MS, "minItems": 1}
_NOISE = _object({"cv": _NUMBER, "drift": _NUMBER, "warnings": {"type": "array", "items": _STRING}})
_STAGE = {"enum": list(STAGES)}
_EXPORT = _object(
    {
        "directory": _STRING,
        "runtime": _STRING,
        "kind": {"enum": ["encoder", "vlm", "vla"]},
        "export": {"type": "object"},
        "headline": _STRING,
        "headline_components": {"type": "array", "items": _STRING, "minItems": 1},
        "timing": _SUMMARY,
        "samples_ms": _SAMPLES,
        "components": {"type": "object", "additionalProperties": _SUMMARY},
        "component_samples_ms": {"type": "object", "additionalProperties": _SAMPLES},
        "throughput_per_s": _MS,
        "artifact_bytes": _INT,
        "threads": _nullable(_INT),
        "noise": _NOISE,
        "cold": _nullable(
            _object(
                {
                    **{name: _MS for name in ("import_ms", "load_ms", "first_run_ms", "peak_rss_mib")},
                    "processes": {"type": "integer", "minimum": 1},
                }
            )
        ),
        "cold_unavailable": _nullable(_STRING),
        "generation": _nullable(_SUMMARY),
        "generation_tokens": _nullable({"type": "integer", "minimum": 1}),
        "deadlines": {
            "type": "object",
            "additionalProperties": _object(
                {
                    "rate_hz": {"type": "number", "exclusiveMinimum": 0},
                    "deadline_ms": _MS,
                    "misses": _INT,
                    "share": {"type": "number", "minimum": 0, "maximum": 1},
                    "worst_overrun_ms": _MS,
                    "sustained_hz": _MS,
                }
            ),
        },
        "operators": {
            "type": "object",
            "additionalProperties": _object(
                {
                    "component": _STRING,
                    "runs": {"type": "integer", "minimum": 1},
                    "total_ms": _MS,
                    "stages": {
                        "type": "array",
                        "items": _object({"stage": _STAGE, "ms": _MS, "share": _NUMBER, "operators": _INT}),
                    },
                    "top": {
                        "type": "array",
                        "items": _object(
                            {
                                "name": _STRING,
                                "op_type": _STRING,
                                "stage": _STAGE,
                                "ms": _MS,
                                "share": _NUMBER,
                                "scope": _STRING,
                            }
                        ),
                    },
                    "attribution": {"enum": ["scopes", "component"]},
                }
            ),
        },
        "operators_unavailable": _nullable(_STRING),
        "overhead_ms": {"type": "object", "additionalProperties": _MS},
    }
)
_IDEAL = _object(
    {
        "flops_ideal": _MS,
        "calibrated_ideal": _MS,
        "reached": _MS,
        "untouchable_share": {"type": "number", "minimum": 0, "maximum": 1},
        "basis": {"enum": ["operators", "components"]},
        "stage_rates_gflops": {"type": "object", "additionalProperties": _MS},
        "fixed_overhead_ms": _nullable(_MS),
    }
)
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tpc.dev/schemas/profile-1.json",
    "title": "tpc profile report",
    **_object(
        {
            "format": {"const": REPORT_FORMAT},
            "created": _STRING,
            "machine": _object(
                {
                    "platform": _STRING,
                    "cpu": _STRING,
                    "cores": _nullable({"type": "integer", "minimum": 1}),
                    "memory_gib": _nullable(_MS),
                    "gpu": _nullable(_STRING),
                    "python": _STRING,
                    "versions": {"type": "object", "additionalProperties": _STRING},
                }
            ),
            "settings": _object(
                {
                    "runs": {"type": "integer", "minimum": 1},
                    "warmup": _INT,
                    "auto": {"type": "boolean"},
                    "stopped_by": {"enum": ["runs", "precision", "time cap", "etdump"]},
                    "precision": {"type": "number", "exclusiveMinimum": 0},
                    "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "order": _STRING,
                }
            ),
            "export": _EXPORT,
            "baseline": _nullable(_EXPORT),
            "comparison": _nullable(
                _object(
                    {
                        "ratios": {"type": "array", "items": _RATIO, "minItems": 1},
                        "components": {"type": "object", "additionalProperties": {"type": "array", "items": _RATIO}},
                        "verdict": _STRING,
                        "measurable": {"type": "boolean"},
                        "ideal": _nullable(_IDEAL),
                        "ideal_unavailable": _nullable(_STRING),
                    }
                )
            ),
            "warnings": {"type": "array", "items": _STRING},
        }
    ),
}


def validate(data: dict[str, Any]) -> None:
    """Raises jsonschema's ValidationError (the best match) when `data` is not a valid report."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise error
