"""ONNX target: torch.export -> tpc op lowering -> torch.onnx (dynamo) -> static-shape legality check.

The graph must have every shape fixed by the configuration: no symbolic dimension anywhere, no op whose
output size depends on data (NonZero, Unique, ...), and every TopK's K a constant. `check_static_graph`
enforces this on the written file, so a regression in any method's lowering fails the export, not a device.

Passes (`OnnxTarget.passes`, run by `run_passes`): `lower_tpc_ops` (flat) -> `to_onnx` -> `static_shapes`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tpc.exporter.base import ExportPart, LowerTpcOps, Target, export_program
from tpc.exporter.graph_pass import CheckPass, GraphContractError, GraphPass, run_passes

OPSET = 18
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Compress", "Loop", "If", "Scan", "SequenceConstruct"})


class StaticShapeError(GraphContractError):
    """The exported graph breaks the static-shape contract (a bug in a method's lowering, not user input)."""


def _constant_names(model: Any) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)
    return names


def check_static_graph(model: Any) -> Any:
    """Raise StaticShapeError naming the offending node or value if any shape could depend on data; returns the
    shape-inferred model (what other checks read types and constants from)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    constants = _constant_names(inferred)
    for node in inferred.graph.node:
        if node.op_type in DATA_DEPENDENT_OPS:
            raise StaticShapeError(f"node '{node.name}' is {node.op_type}, whose output shape depends on data")
        if node.op_type == "TopK" and node.input[1] not in constants:
            raise StaticShapeError(f"TopK node '{node.name}' takes K from a computed tensor, not a constant")
    values = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            raise StaticShapeError(f"value '{value.name}' has a non-static shape")
    return inferred


def write_onnx(
    program: torch.export.ExportedProgram,
    inputs: dict[str, Tensor],
    output_names: tuple[str, ...],
    path: Path,
    translations: dict | None = None,
) -> Any:
    """torch.onnx (dynamo) of an exported program at `path`, checked by onnx's full checker; returns the model.
    `translations`: ONNX functions for ops the exporter has none for (TensorRT's plugin node)."""
    import onnx

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program,
            tuple(inputs.values()),
            input_names=list(inputs),
            output_names=list(output_names),
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
            custom_translation_table=translations,
        )
    assert onnx_program is not None  # the dynamo exporter always returns its ONNXProgram
    onnx_program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


class ToOnnx(GraphPass[Any]):
    """ExportedProgram -> the ONNX model written at `path` (`write_onnx`), which onnx's full checker accepts."""

    name = "to_onnx"

    def __init__(self, part: ExportPart, path: Path, translations: dict | None = None) -> None:
        self.part, self.path, self.translations = part, path, translations

    def requires(self, program: Any) -> None:
        if not isinstance(program, torch.export.ExportedProgram):
            raise TypeError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")

    def call(self, program: torch.export.ExportedProgram) -> Any:
        return write_onnx(program, self.part.inputs, self.part.output_names, self.path, self.translations)


class StaticShapes(CheckPass[Any]):
    """Every shape of the ONNX model fixed by the configuration (`check_static_graph`, StaticShapeError)."""

    name = "static_shapes"

    def check(self, model: Any) -> None:
        check_static_graph(model)


def op_counts(model: Any) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


class OnnxTarget(Target):
    name = "onnx"
    suffix = ".onnx"
    extra = "onnx"
    requires = ("onnx", "onnxscript", "onnxruntime")
    runtime = "onnxruntime"

    def passes(self, part: ExportPart, path: Path) -> list[GraphPass[Any]]:
        """From the traced program to the checked ONNX file at `path`, in order."""
        return [LowerTpcOps("flat"), ToOnnx(part, path), StaticShapes()]

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        part = ExportPart(module, inputs, output_names)
        model = run_passes(self.passes(part, path), export_program(module, inputs), self.name)
        return {
            "opset": OPSET,
            "op_counts": op_counts(model),
            "versions": {"onnx": version("onnx")},
        }
