"""`tpc.json`: what an export directory holds, enough for a device without PyTorch to run and check it.

Written once per export; `verify` adds its result. Inputs/outputs are listed with static shapes and dtypes,
`samples/inputs.npz` and `samples/expected.npz` are keyed by the same names.
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
FORMAT_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorSpec:
        return cls(name=name, shape=list(array.shape), dtype=str(array.dtype))


@dataclass
class Manifest:
    model: dict[str, Any]  # ref (as given), path (resolved), family, model_type
    method: str
    keep: int
    params: dict[str, Any]
    target: str
    artifact: str
    dtype: str
    batch: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tokens: dict[str, Any]  # before / after / grid / prefix_tokens
    graph: dict[str, Any]
    versions: dict[str, str]
    sample_seed: int = 0
    verification: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

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
                f"'{path}' has format version {data.get('format_version')}; this tpc reads {FORMAT_VERSION}"
            )
        data["inputs"] = [TensorSpec(**spec) for spec in data["inputs"]]
        data["outputs"] = [TensorSpec(**spec) for spec in data["outputs"]]
        return cls(**data)


def write_samples(directory: Path, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    samples = directory / SAMPLES_DIR
    samples.mkdir(exist_ok=True)
    np.savez(samples / INPUTS_FILE, **inputs)
    np.savez(samples / EXPECTED_FILE, **expected)


def read_samples(directory: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(directory / SAMPLES_DIR / name) as data:
        return {key: data[key] for key in data.files}
