"""`tpc.json`: what an export directory holds, enough for a device without PyTorch to run and check it.

Written once per export; `verify` adds its result. Each component (one graph: `model` for an encoder;
`vision`, `prefill`, `decode` for a VLM) lists its artifact and its inputs/outputs with static shapes and
dtypes. Its samples are keyed by the same names: `samples/inputs.npz` + `samples/expected.npz` for a
one-graph export, `samples/<component>/inputs.npz` + `expected.npz` for each component of a VLM, plus
`samples/generation.npz` (pixel_values, input_ids and the greedy tokens eager PyTorch generates); a policy's
`samples/episode.npz` holds a seeded episode (frames, prompt) and what eager PyTorch does at every step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError

MANIFEST_FILE = "tpc.json"
SAMPLES_DIR = "samples"
INPUTS_FILE = "inputs.npz"
EXPECTED_FILE = "expected.npz"
GENERATION_FILE = "generation.npz"
EPISODE_FILE = "episode.npz"
SINGLE_COMPONENT = "model"
FORMAT_VERSION = 2


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
    generation: dict[str, Any] | None = None  # VLMs: prompt layout, cache layout, the step protocol
    policy: dict[str, Any] | None = None  # policies: state tensors, graph schedule, prompt, action decoding
    sample_seed: int = 0
    verification: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)

    @property
    def methods(self) -> list[ComponentSpec]:
        """Every graph the artifacts hold: the components, a staged one as its stages."""
        return [method for component in self.components for method in component.methods]

    def write(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise UsageError(f"'{directory}' is not a directory; pass the output directory of `tpc export`")
        if not path.exists():
            raise UsageError(f"'{directory}' is not a tpc export: it has no {MANIFEST_FILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno})") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"'{path}' has format version {data.get('format_version')}; this tpc reads {FORMAT_VERSION} "
                "(re-export it with this version)"
            )
        data["components"] = [ComponentSpec.from_dict(c) for c in data["components"]]
        return cls(**data)


def samples_dir(directory: Path, component: str) -> Path:
    base = directory / SAMPLES_DIR
    return base if component == SINGLE_COMPONENT else base / component


def write_samples(
    directory: Path, component: str, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    where = samples_dir(directory, component)
    where.mkdir(parents=True, exist_ok=True)
    np.savez(where / INPUTS_FILE, **inputs)
    np.savez(where / EXPECTED_FILE, **expected)


def read_samples(directory: Path, component: str, name: str) -> dict[str, np.ndarray]:
    with np.load(samples_dir(directory, component) / name) as data:
        return {key: data[key] for key in data.files}
