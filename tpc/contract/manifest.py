"""`tpc.json`: what an export directory holds, enough for a device without PyTorch to run and check it.

Written once per export; `verify` adds its result. Each component (one graph: `model` for an encoder;
`vision`, `prefill`, `decode` for a VLM) lists its artifact and its inputs/outputs with static shapes and
dtypes. Its samples are keyed by the same names: `samples/inputs.npz` + `samples/expected.npz` for a
one-graph export, `samples/<component>/inputs.npz` + `expected.npz` for each component of a VLM, plus
`samples/generation.npz` (pixel_values, input_ids and the greedy tokens eager PyTorch generates); a policy's
`samples/episode.npz` holds a seeded episode (frames, prompt) and what eager PyTorch does at every step.

Nothing forged. `files` records the sha256 of every file of the export (all but `tpc.json` itself), computed each
time tpc.json is written, so after the last write they are the hashes of the final files. Every path the
manifest names resolves inside the export directory (`inside`: no `..`, no absolute path, no symlink out).
`Manifest.read` validates tpc.json against `SCHEMA` (JSON Schema): unknown or missing keys, wrong types, NaN or
infinity, another `format_version` are one `UsageError` line. Format 3 added `files` and the strict schema; `cost`
(FLOPs and bytes per stage of each component, tpc.contract.cost) is optional within it, absent from exports written
before it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from tpc.contract.cost import StageCost, costs_from_dicts
from tpc.contract.names import MANIFEST_FILE, STAGES
from tpc.contract.protocols import GenerationProtocol, PolicyProtocol
from tpc.errors import UsageError

SAMPLES_DIR = "samples"
INPUTS_FILE = "inputs.npz"
EXPECTED_FILE = "expected.npz"
GENERATION_FILE = "generation.npz"
EPISODE_FILE = "episode.npz"
SINGLE_COMPONENT = "model"
FORMAT_VERSION = 3
MULTI_METHOD_TARGETS = ("executorch",)  # targets whose one artifact holds every graph as a named method


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorSpec:
        return cls(name=name, shape=list(array.shape), dtype=str(array.dtype))


@dataclass
class ComponentSpec:
    name: str
    artifact: str  # file name inside the export directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    graph: dict[str, Any] = field(default_factory=dict)  # target facts: opset, op counts, delegation, ...
    method: str | None = None  # the entry point inside a multi-method artifact (ExecuTorch); None: its only graph
    teacher_forced: str | None = None  # artifact taking `kept_indices` as input, for runtimes that cannot cut
    # a policy step lowered per stage: its `prefill` and `decode` methods, each a full spec with its own samples
    # (`samples/<stage method>/`); the runtime drives them (tpc.runtimes.staged) behind this spec's inputs/outputs
    stages: list[ComponentSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentSpec:
        data = dict(data)
        data["inputs"] = [TensorSpec(**spec) for spec in data["inputs"]]
        data["outputs"] = [TensorSpec(**spec) for spec in data["outputs"]]
        data["stages"] = [cls.from_dict(stage) for stage in data.get("stages", [])]
        return cls(**data)

    @property
    def methods(self) -> list[ComponentSpec]:
        """The graphs this component runs as: its stages, or itself."""
        return self.stages or [self]


@dataclass
class Manifest:
    model: dict[str, Any]  # ref (as given), path (resolved), family, model_type
    method: str
    keep: int
    params: dict[str, Any]
    target: str
    dtype: str
    batch: int
    components: list[ComponentSpec]
    tokens: dict[str, Any]  # before / after / grid / prefix_tokens
    versions: dict[str, str]
    generation: GenerationProtocol | None = None  # VLMs: prompt layout, cache layout, the step protocol
    policy: PolicyProtocol | None = None  # policies: state tensors, graph schedule, prompt, action decoding
    runtime: str | None = None  # the runtime that runs the artifacts (None in exports written before it was recorded)
    sample_seed: int = 0
    verification: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of every file but tpc.json
    # FLOPs and bytes per stage of one call of each component (tpc.contract.cost); None: written before it was
    # recorded, for which `tpc profile` says the ideal speedups are unavailable
    cost: list[StageCost] | None = None

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)

    @property
    def methods(self) -> list[ComponentSpec]:
        """Every graph the artifacts hold: the components, a staged one as its stages."""
        return [method for component in self.components for method in component.methods]

    def write(self, directory: Path) -> None:
        """Record the sha256 of every file now in `directory` (`files`), then write tpc.json as strict JSON.

        Call it after the last file of the export is written: the hashes are of the files as they are now."""
        self.files = file_hashes(directory)
        data = asdict(self)
        data["generation"] = self.generation.to_dict() if self.generation is not None else None
        data["policy"] = self.policy.to_dict() if self.policy is not None else None
        data = _finite(data, "tpc.json")
        (directory / MANIFEST_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """The manifest of an export directory, validated: one `UsageError` line for anything malformed."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise UsageError(f"'{directory}' is not a directory; pass the output directory of `tpc export`")
        if not path.is_file():
            raise UsageError(f"'{directory}' is not a tpc export: it has no {MANIFEST_FILE}")
        try:
            data = json.loads(path.read_text(), parse_constant=_reject_constant)
        except json.JSONDecodeError as err:
            raise UsageError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno})") from None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UsageError(f"cannot read '{path}': {err}") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            shown = json.dumps(version)[:40]
            raise UsageError(
                f"'{path}' has format version {shown}; this tpc reads {FORMAT_VERSION} (re-export it with this version)"
            )
        _validate(data, path)
        data["components"] = [ComponentSpec.from_dict(c) for c in data["components"]]
        if data["generation"] is not None:
            data["generation"] = GenerationProtocol.from_dict(data["generation"])
        if data["policy"] is not None:
            data["policy"] = PolicyProtocol.from_dict(data["policy"])
        if data.get("cost") is not None:
            data["cost"] = costs_from_dicts(data["cost"])
        manifest = cls(**data)
        for spec in manifest.methods:  # only a multi-method artifact (ExecuTorch's .pte) names its entry point
            if (spec.method is None) == (manifest.target in MULTI_METHOD_TARGETS):
                raise UsageError(
                    f"'{path}' is not a valid tpc manifest: components: '{spec.name}' has method {spec.method!r}, "
                    f"which a {manifest.target} artifact {'needs' if spec.method is None else 'does not have'} "
                    "(re-export it)"
                )
        for relative in manifest.named_files():
            inside(directory, relative)
        for relative in manifest.files:
            inside(directory, relative)
        return manifest

    def named_files(self) -> list[str]:
        """Every path the manifest names: artifacts and teacher-forced artifacts (relative to the directory)."""
        named = []
        for component in self.components:
            for spec in [component, *component.stages]:
                named += [spec.artifact] + ([spec.teacher_forced] if spec.teacher_forced else [])
        return list(dict.fromkeys(named))


def inside(directory: Path, relative: str, what: str = "file") -> Path:
    """`directory / relative`, refused (UsageError) unless it resolves inside `directory`: no `..`, no absolute
    path, no symlink pointing out. Every path an export directory names is joined through this."""
    directory = Path(directory)
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    problem = None
    if not relative or "\x00" in relative:
        problem = "is empty" if not relative else "holds a NUL byte"
    elif posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith("\\"):
        problem = "is an absolute path"
    elif ".." in posix.parts or ".." in windows.parts:
        problem = "climbs out with '..'"
    else:
        root = directory.resolve()
        target = (directory / relative).resolve()
        if target != root and not target.is_relative_to(root):
            problem = f"resolves outside the export directory (to '{target}', through a symlink)"
    if problem is not None:
        raise UsageError(
            f"'{directory}' names the {what} '{relative}', which {problem}; every file of an export must lie inside "
            "its directory (re-export it)"
        )
    return directory / relative


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except tpc.json, by relative POSIX path (a Core ML package is a
    directory: each of its files is recorded)."""
    directory = Path(directory)
    hashes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST_FILE and path.is_file():
            hashes[relative] = sha256(path)
    return hashes


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(directory: Path, manifest: Manifest) -> tuple[list[str], list[str], list[str]]:
    """(files whose content differs from the hash recorded at export, recorded files that are missing, files
    that were not part of the export when it was written)."""
    changed, missing = [], []
    for relative, digest in manifest.files.items():
        path = inside(directory, relative)
        if not path.is_file():
            missing.append(relative)
        elif sha256(path) != digest:
            changed.append(relative)
    directory = Path(directory)
    present = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    added = sorted(name for name in present if name != MANIFEST_FILE and name not in manifest.files)
    return changed, missing, added


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in tpc.json (strict JSON)")


def _finite(value: Any, where: str) -> Any:
    """`value` as plain JSON data; NaN or infinity never reach tpc.json (UsageError names where it was)."""
    if isinstance(value, dict):
        return {key: _finite(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise UsageError(f"{where} is {value}: NaN and infinity are never written to tpc.json (strict JSON)")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _validate(data: dict[str, Any], path: Path) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(top level)"
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    raise UsageError(f"'{path}' is not a valid tpc manifest: {where.lstrip('.')}: {message} (re-export it)")


# --- the schema of tpc.json, format 3 ---------------------------------------------------------------------------

_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"}  # component, method and tensor names
_PATH = {"type": "string", "minLength": 1}
_INTS = {"type": "array", "items": _INT}
_NUMBERS = {"type": "array", "items": {"type": "number"}}
_COUNTS = {"type": "array", "items": _COUNT}
_OBJECT = {"type": "object"}
_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


def _record(properties: dict[str, Any], optional: tuple[str, ...] = (), closed: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": [key for key in properties if key not in optional],
        **({"additionalProperties": False} if closed else {}),
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "null"}, schema]}


_TENSOR = _record({"name": _NAME, "shape": _COUNTS, "dtype": {"enum": _DTYPES}})
_GRAPH = _record(  # target facts; read by `tpc inspect`: typed where read, open to new facts
    {
        "opset": _INT,
        "op_counts": {"type": "object", "additionalProperties": _COUNT},
        "mil_ops": {"type": "object", "additionalProperties": _COUNT},
        "delegation": _OBJECT,
        "neural_engine": {
            "type": "object",
            "additionalProperties": _record({"count": _COUNT, "reason": _STR, "source": _STR}, closed=False),
        },
        "inputs": _OBJECT,
        "outputs": _OBJECT,
    },
    optional=("opset", "op_counts", "mil_ops", "delegation", "neural_engine", "inputs", "outputs"),
    closed=False,
)
_COMPONENT = _record(
    {
        "name": _NAME,
        "artifact": _PATH,
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "graph": _GRAPH,
        "method": _nullable(_NAME),
        "teacher_forced": _nullable(_PATH),
        "stages": {"type": "array", "items": {"$ref": "#/$defs/component"}},
    }
)
_COST = _record(
    {"component": _NAME, "stage": {"enum": list(STAGES)}, "flops": _COUNT, "bytes": _COUNT, "floor_flops": _COUNT}
)
_PROMPT = {
    "text_tokens": _COUNT,
    "image_start": _COUNT,
    "image_tokens": _COUNT,
    "length": _COUNT,
}
_GENERATION = _record(
    {
        "image_token_id": _INT,
        "eos_token_ids": _INTS,
        "prompt": _record({**_PROMPT, "image_starts": _COUNTS}, optional=("image_starts",)),
        "prefill": _record({"length": _COUNT, "image_tokens": _COUNT}),
        "max_new_tokens": {"type": "integer", "minimum": 1},
        "decoder_layers": _COUNT,
        "cache": _record({"lengths_after_prefill": _COUNTS, "capacity": _COUNTS, "next_position": _COUNT}),
        "protocol": _STR,
        "seg_token_id": _INT,
        "vision_to_prefill": {"type": "array", "items": _NAME},
    },
    optional=("seg_token_id", "vision_to_prefill"),
)
_NORMALIZATION = _record({"tower": _STR, "mean": _NUMBERS, "std": _NUMBERS})
_STATE = _record(
    {
        "history": _record(
            {
                "shape": _COUNTS,
                "dtype": {"enum": _DTYPES},
                "initial": _STR,
                "input": _NAME,
                "output": _NAME,
                "order": _STR,
            }
        ),
        "history_len": _record({"initial": _COUNT, "max": _COUNT, "update": _STR}),
    }
)
_POLICY = _record(
    {
        "action_dim": {"type": "integer", "minimum": 1},
        "n_action_bins": {"type": "integer", "minimum": 1},
        "action_vocab_size": {"type": "integer", "minimum": 1},
        "unnorm_key": _nullable(_STR),
        "action_stats": _nullable(  # one dataset's statistics: a list per statistic (the mask's booleans)
            {"type": "object", "additionalProperties": {"type": "array", "items": {"type": ["number", "boolean"]}}}
        ),
        "image": _record({"size": _COUNT, "normalization": {"type": "array", "items": _NORMALIZATION}}),
        "prompt": _record({**_PROMPT, "template": _STR, "empty_token_id": _INT}),
        "kept_image_tokens": _COUNT,
        "decoder_lengths": _record({"pruned": _COUNTS, "full": _COUNTS}),
        "state": {"anyOf": [{"type": "object", "maxProperties": 0}, _STATE]},  # {}: stateless
        "graphs": {"type": "object", "additionalProperties": _STR},
        "protocol": _STR,
        "stages": _STR,
    },
    optional=("stages",),
)
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {"component": _COMPONENT},
    **_record(
        {
            "model": _record({"ref": _STR, "path": _STR, "family": _STR, "model_type": _STR}),
            "method": _STR,
            "keep": _COUNT,
            "params": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
            "target": _STR,
            "dtype": {"enum": ["fp32", "fp16"]},
            "batch": {"type": "integer", "minimum": 1},
            "components": {"type": "array", "items": {"$ref": "#/$defs/component"}, "minItems": 1},
            "tokens": _record(  # kept_runs: the widths of kept_indices' runs, when a schedule prunes more than once
                {
                    "before": _COUNT,
                    "after": _COUNT,
                    "grid": _COUNTS,
                    "prefix_tokens": _COUNT,
                    "stage": _STR,
                    "kept_runs": _COUNTS,
                },
                optional=("kept_runs",),
            ),
            "versions": {"type": "object", "additionalProperties": _STR},
            "generation": _nullable(_GENERATION),
            "policy": _nullable(_POLICY),
            "runtime": _nullable(_STR),
            "sample_seed": _COUNT,
            "verification": _nullable(
                _record({"passed": {"type": ["boolean", "null"]}, "skipped": _STR}, optional=("skipped",), closed=False)
            ),
            "format_version": {"const": FORMAT_VERSION},
            "extra": _OBJECT,
            "files": {
                "type": "object",
                "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "minProperties": 1,
            },
            "cost": _nullable({"type": "array", "items": _COST}),
        },
        # runtime: recorded since the architecture change, older exports run by their target's; cost: since the
        # per-stage cost model, older exports have no ideal speedups
        optional=("runtime", "cost"),
    ),
}


def samples_dir(directory: Path, component: str) -> Path:
    base = directory / SAMPLES_DIR
    return base if component == SINGLE_COMPONENT else inside(directory, f"{SAMPLES_DIR}/{component}", "samples")


def write_samples(
    directory: Path, component: str, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    where = samples_dir(directory, component)
    where.mkdir(parents=True, exist_ok=True)
    write_npz(where / INPUTS_FILE, inputs)
    write_npz(where / EXPECTED_FILE, expected)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An `.npz` of named arrays; never a pickle (`load_npz` refuses them), so only non-object arrays."""
    np.savez(path, allow_pickle=False, **arrays)


def read_samples(directory: Path, component: str, name: str) -> dict[str, np.ndarray]:
    """One sample file of a component; a missing or unreadable file is one UsageError line."""
    return read_npz(directory, samples_dir(directory, component).relative_to(directory).as_posix() + "/" + name)


def read_npz(directory: Path, relative: str) -> dict[str, np.ndarray]:
    """An `.npz` of the export (`relative` to it), every array loaded; missing or corrupt -> UsageError."""
    path = inside(directory, relative, "sample file")
    return load_npz(
        path, f"'{path}' is missing: the export is incomplete (re-export it)", f"'{path}'", "; re-export it"
    )


def load_npz(path: Path, missing: str, name: str, fix: str = "") -> dict[str, np.ndarray]:
    """Every array of an `.npz`, never unpickling; `missing`: the line when there is no file, `name` and `fix`:
    how the line for an unreadable one names it and ends."""
    if not path.is_file():
        raise UsageError(missing)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as err:  # zipfile, pickle refusal, truncated member: numpy raises many kinds
        raise UsageError(f"{name} is not a readable .npz ({type(err).__name__}: {err}){fix}") from None
