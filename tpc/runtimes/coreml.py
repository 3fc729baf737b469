"""Core ML runtime: run an exported `.mlpackage` with coremltools' `MLModel.predict` (macOS only).

Core ML's prediction engine is part of macOS; coremltools on Linux converts and saves models but cannot load
them, so `load` raises `RuntimeUnavailable` off macOS (`tpc verify --allow-skip` accepts the checks that ran).

The artifact carries what the runtime needs besides the model (tpc.exporter.coreml writes it as user-defined
metadata), so nothing from the export's manifest is required here:
  * feature names: ML program names must match [A-Za-z_][A-Za-z0-9_]*, so `past.0.key` is `past_0_key` in Core ML;
  * each output's eager dtype: Core ML has no int64, so indices and token ids come back as int32 and are
    cast back; float outputs come back as the artifact's float type (fp32 I/O also for FP16 compute);
  * the compute units chosen at export (a default; `load(..., compute_units=...)` overrides it).
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import RuntimeUnavailable, UsageError, unknown_name
from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime, TensorIO, artifact_path, invalid_artifact

# Option value -> coremltools.ComputeUnit member name.
COMPUTE_UNITS: dict[str, str] = {
    "all": "ALL",
    "cpu_and_gpu": "CPU_AND_GPU",
    "cpu_only": "CPU_ONLY",
    "cpu_and_ne": "CPU_AND_NE",
}
# User-defined metadata keys the exporter writes into the model.
NAMES_KEY = "tpc.io_names"  # JSON {Core ML feature name: tpc name}
OUTPUT_DTYPES_KEY = "tpc.output_dtypes"  # JSON {tpc output name: numpy dtype of the eager output}
COMPUTE_UNITS_KEY = "tpc.compute_units"  # option value chosen at export
# Model description ArrayDataType values -> numpy dtype.
ARRAY_DTYPES: dict[int, str] = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}


def unavailable_reason() -> str | None:
    """Why Core ML prediction cannot run on this machine, or None where it can."""
    if sys.platform != "darwin":
        return (
            f"Core ML prediction runs only on macOS (this machine is {sys.platform}); copy the export to a Mac "
            "and run `tpc verify` there, or pass --allow-skip to accept the checks that can run here"
        )
    return None


MLPACKAGE = "Core ML package"


def check_mlpackage(artifact: str | Path) -> Path:
    """`artifact` if it is a complete `.mlpackage` (checked without coremltools, so on any OS): a directory whose
    `Manifest.json` names its root model, every item it lists present under `Data/`, the root model non-empty.
    Otherwise one UsageError line."""
    path = artifact_path(artifact, MLPACKAGE, directory=True)
    manifest = path / "Manifest.json"
    try:
        data = json.loads(manifest.read_text())
        items = data["itemInfoEntries"]
        root = items[data["rootModelIdentifier"]]["path"]
        paths = [item["path"] for item in items.values()]
    except FileNotFoundError:
        raise UsageError(f"'{path}' is not a valid {MLPACKAGE} (it has no Manifest.json); re-export it") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise invalid_artifact(path, MLPACKAGE, f"unreadable Manifest.json: {type(err).__name__} {err}") from None
    for relative in paths:
        item = path / "Data" / relative
        if not item.exists() or (relative == root and (not item.is_file() or item.stat().st_size == 0)):
            raise UsageError(
                f"'{path}' is not a valid {MLPACKAGE} ('Data/{relative}' is missing or empty); re-export it"
            )
    return path


def check_compute_units(value: str) -> str:
    if value not in COMPUTE_UNITS:
        raise unknown_name("Core ML compute units", value, COMPUTE_UNITS)
    return value


class CoreMLRuntime(Runtime):
    name = "coreml"
    cuts_outputs = False  # an ML program cannot be cut at run time: teacher forcing loads a second artifact
    requires = ("coremltools",)
    extra = "coreml"

    def __init__(self, model: Any, spec: Any) -> None:
        self.model = model
        user = dict(spec.description.metadata.userDefined)
        tpc_names: dict[str, str] = json.loads(user.get(NAMES_KEY, "{}"))  # Core ML -> tpc
        self.input_dtypes = {f.name: ARRAY_DTYPES[f.type.multiArrayType.dataType] for f in spec.description.input}
        # an input and an output may share a tpc name (a teacher-forced graph's kept_indices): two maps
        self.coreml_inputs = {tpc_names.get(name, name): name for name in self.input_dtypes}
        self.tpc_outputs = {f.name: tpc_names.get(f.name, f.name) for f in spec.description.output}
        self.output_dtypes: dict[str, str] = json.loads(user.get(OUTPUT_DTYPES_KEY, "{}"))

    @classmethod
    def load(
        cls,
        artifact: Path,
        entry: Entry = ONLY_GRAPH,
        forced: tuple[str, ...] = (),
        *,
        compute_units: str | None = None,
    ) -> CoreMLRuntime:
        """Open the `.mlpackage`. `compute_units`: all, cpu_and_gpu, cpu_only or cpu_and_ne (default: the
        export's choice, else all). Teacher forcing (`forced`) has no run-time form here: a Core ML program cannot
        be cut open, so tpc converts a second artifact whose inputs include `kept_indices` instead. `entry` is
        not needed: the model's own description (with tpc's name map in its metadata) gives the names."""
        if forced:
            raise ValueError(
                f"Core ML artifacts cannot turn outputs {list(forced)} into inputs at run time; teacher forcing "
                "uses a separately converted artifact that takes kept_indices as an input"
            )
        path = check_mlpackage(artifact)  # a damaged package is an error on any OS, before the platform check
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeUnavailable(reason)
        import coremltools as ct

        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as err:  # protobuf's DecodeError and coremltools' own
            raise invalid_artifact(path, MLPACKAGE, err) from None
        units = compute_units or dict(spec.description.metadata.userDefined).get(COMPUTE_UNITS_KEY, "all")
        check_compute_units(units)
        try:
            model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units]))
        except Exception as err:  # Core ML's compiler refusing the model
            raise invalid_artifact(path, MLPACKAGE, err) from None
        return cls(model, spec)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, value in inputs.items():
            if name not in self.coreml_inputs:
                raise ValueError(
                    f"'{name}' is not an input of this Core ML model (inputs: {sorted(self.coreml_inputs)})"
                )
            coreml = self.coreml_inputs[name]
            feed[coreml] = np.ascontiguousarray(np.asarray(value).astype(self.input_dtypes[coreml], copy=False))
        outputs = self.model.predict(feed)
        result = {}
        for coreml, name in self.tpc_outputs.items():
            value = np.asarray(outputs[coreml])
            result[name] = value.astype(self.output_dtypes.get(name, value.dtype), copy=False)
        return result

    @classmethod
    def artifact_io(
        cls, path: Path, method: str | None, want_inputs: TensorIO, want_outputs: TensorIO
    ) -> tuple[TensorIO, TensorIO]:
        """The package's model description; Core ML has no int64 (int32 stands for it where tpc.json says int64)
        and the runtime returns each output in the eager dtype recorded in the model's metadata."""
        import coremltools as ct

        description = ct.utils.load_spec(str(path)).description
        user = dict(description.metadata.userDefined)
        names = json.loads(user.get(NAMES_KEY, "{}"))
        output_dtypes = json.loads(user.get(OUTPUT_DTYPES_KEY, "{}"))

        def described(features: Any, want: TensorIO, dtypes: dict[str, str]) -> TensorIO:
            io = {}
            for feature in features:
                name = names.get(feature.name, feature.name)
                array = feature.type.multiArrayType
                dtype = dtypes.get(name) or ARRAY_DTYPES.get(array.dataType, str(array.dataType))
                if dtype == "int32" and want.get(name, ([], ""))[1] == "int64":
                    dtype = "int64"  # the runtime casts int64 <-> int32
                io[name] = ([int(d) for d in array.shape], dtype)
            return io

        return (
            described(description.input, want_inputs, {}),
            described(description.output, want_outputs, output_dtypes),
        )

    @classmethod
    def versions(cls) -> dict[str, str]:
        try:  # the distribution's version: importing coremltools costs seconds
            return {"coremltools": metadata.version("coremltools")}
        except metadata.PackageNotFoundError:
            return {}
