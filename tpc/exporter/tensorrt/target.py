"""TensorRT target: a TensorRT-legal ONNX per component, the fused select plugin's sources, `build_engine.sh`.

TensorRT builds engines from ONNX, and an engine is specific to the GPU and TensorRT version it was built
with, so the artifact a Jetson user takes is the ONNX, restricted to what TensorRT's ONNX parser imports, with
static shapes; the engine is built on the device (`build_engine.sh`, or `tpc verify` where `tensorrt` imports,
see `tpc.runtimes.tensorrt`). The `tensorrt_legality` pass fails the export, naming the node, when a graph
breaks the rules (`legality`), so a lowering regression surfaces here and not on the robot.

The select op has two lowerings (`--param trt_select=`), each an ordered pass list (`TensorRTTarget.passes`):
  native  lower_tpc_ops (float32) -> to_onnx -> tensorrt_legality: TopK (threshold) + TopK (ascending) + Gather
          in float32 (`tpc.ops.select.float32_kept_indices`): TensorRT has no float64 (the parser casts it
          down) and its TopK documents no tie order, so the tie rule is kept without relying on either. ONNX
          Runtime runs this graph here, so it is verified.
  plugin  to_onnx (the op as one `tpc::TokenSelect` node) -> insert_plugin_nodes -> tensorrt_legality: one node
          served by tpc's fused CUDA kernel (`plugins_cuda/`, `plugin_nodes`).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from tpc.exporter.base import Artifact, ExportPart, LowerTpcOps, Target, TargetOptions, export_program
from tpc.exporter.graph_pass import GraphPass, run_passes
from tpc.exporter.onnx import OPSET, ToOnnx, op_counts
from tpc.exporter.tensorrt.build_script import write_build_script
from tpc.exporter.tensorrt.legality import TensorRTLegality
from tpc.exporter.tensorrt.options import TensorRTOptions
from tpc.exporter.tensorrt.plugin_nodes import InsertPluginNodes, plugin_node_count, token_select_translation
from tpc.runtimes.onnxruntime import OnnxRuntime


class TensorRTTarget(Target):
    name = "tensorrt"
    suffix = ".onnx"
    extra = "tensorrt"
    requires = ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon")
    runtime = "tensorrt"
    Options: ClassVar[type[TargetOptions]] = TensorRTOptions
    options: TensorRTOptions

    def passes(self, part: ExportPart, path: Path) -> list[GraphPass[Any]]:
        """From the traced program to the TensorRT-legal ONNX file at `path`, in order, for the select lowering."""
        if self.options.trt_select == "plugin":
            return [ToOnnx(part, path, token_select_translation()), InsertPluginNodes(path), TensorRTLegality()]
        return [LowerTpcOps("float32"), ToOnnx(part, path), TensorRTLegality()]

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        part = ExportPart(module, inputs, output_names)
        model = run_passes(self.passes(part, path), export_program(module, inputs), self.name)
        plugins = plugin_node_count(model)
        return {
            "opset": OPSET,
            "op_counts": op_counts(model),
            "trt_select": self.options.trt_select,
            "plugin_nodes": plugins,
            "tensorrt_legal": True,
            # the plugin node runs only in TensorRT; the native graph runs in ONNX Runtime here
            "onnxruntime_check": onnxruntime_check(path, module, inputs, output_names) if not plugins else None,
            "versions": {"onnx": version("onnx"), "onnx_graphsurgeon": version("onnx_graphsurgeon")},
        }

    def export_components(self, parts: dict[str, ExportPart], directory: Path, root: Path) -> dict[str, Artifact]:
        """Each component's ONNX, then (for the deployable export, not teacher-forced copies) the plugin sources
        and the engine build script."""
        artifacts = super().export_components(parts, directory, root)
        if directory == root:
            plugin = self.options.trt_select == "plugin"
            write_build_script(root, [Path(a.path) for a in artifacts.values()], plugin)
        return artifacts


def onnxruntime_check(
    path: Path, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...]
) -> dict[str, Any]:
    """The TensorRT-legal graph run by ONNX Runtime on the example inputs against eager: the native lowering's
    exactness is checked here, before any device (the engine is checked by `tpc verify` where TensorRT runs)."""
    got = OnnxRuntime.load(path).run({name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        want = {name: out.numpy() for name, out in zip(output_names, module(*inputs.values()), strict=True)}
    floats = [name for name, value in want.items() if value.dtype.kind == "f"]
    exact = [name for name in want if name not in floats]
    return {
        "runtime": "onnxruntime",
        "exact_outputs_equal": all(np.array_equal(got[name], want[name]) for name in exact),
        "max_abs_diff": max((float(np.abs(got[n].astype(np.float64) - want[n]).max()) for n in floats), default=0.0),
    }
