"""TensorRT target: a TensorRT-legal ONNX per component, the fused select plugin's sources, `build_engine.sh`.

TensorRT builds engines from ONNX, and an engine is specific to the GPU and TensorRT version it was built
with, so the artifact a Jetson user takes is the ONNX, restricted to what TensorRT's ONNX parser imports, with
static shapes; the engine is built on the device (`build_engine.sh`, or `tpc verify` where `tensorrt` imports,
see `tpc.runtimes.tensorrt`). `check_tensorrt_graph` fails the export, naming the node, when a graph breaks
the rules, so a lowering regression surfaces here and not on the robot.

The select op has two lowerings (`--param trt_select=`):
  native  TopK (threshold) + TopK (ascending) + Gather in float32 (`tpc.ops.select.float32_kept_indices`):
          TensorRT has no float64 (the parser casts it down) and its TopK documents no tie order, so the tie
          rule is kept without relying on either. ONNX Runtime runs this graph here, so it is verified.
  plugin  one `TokenSelect` node served by tpc's fused CUDA kernel (`plugins_cuda/`): the op is exported as a
          `tpc`-domain node, then `insert_plugin_nodes` (onnx-graphsurgeon) gives it the attributes TensorRT's
          parser finds the plugin by (`plugin_namespace`, `plugin_version`), int32 kept indices as the plugin
          writes them, and a Cast back to int64 for the graph.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tpc.errors import UsageError
from tpc.exporter.base import Artifact, ExportPart, Target, export_program
from tpc.exporter.onnx import OPSET, StaticShapeError, check_static_graph, op_counts, write_onnx
from tpc.ops.lowering import lower_tpc_ops

PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION = "TokenSelect", "tpc", "1"
SELECT_LOWERINGS = ("native", "plugin")
MAX_TOPK_K = 3840  # TensorRT's TopK layer: K <= 3840 (ITopKLayer documentation)
BUILD_SCRIPT = "build_engine.sh"
PLUGIN_DIR = "plugin"

# Operators TensorRT's ONNX parser imports: onnx-tensorrt docs/operators.md (rows marked Y, TensorRT 8.5 table),
# plus those its Changelog adds up to TensorRT 10.6 (8.6: GroupNormalization, LayerNormalization, IsInf;
# 9.2: Hardmax; 10.1: DeformConv; 10.4: the window functions; 10.5: STFT).
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
    Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
    Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
    InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
    SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
    Where Xor
    GroupNormalization LayerNormalization IsInf Hardmax DeformConv BlackmanWindow HammingWindow HannWindow STFT
    """.split()
)
# Input types the same table restricts, for the ops a select lowering uses (ONNX TensorProto data types).
_FLOAT, _FLOAT16, _INT32 = 1, 10, 6
INPUT_TYPES = {"TopK": {_FLOAT, _FLOAT16, _INT32}, "CumSum": {_FLOAT, _FLOAT16}}
_DOUBLE = 11


class TensorRTLegalityError(StaticShapeError):
    """The exported graph breaks a TensorRT rule (a bug in a lowering, not user input); names the node."""


def _is_plugin(node: Any) -> bool:
    return node.op_type == PLUGIN_NAME and any(a.name == "plugin_namespace" for a in node.attribute)


def _constant_values(model: Any) -> dict[str, Any]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def check_tensorrt_graph(model: Any) -> None:
    """Static shapes (as for ONNX), every op one TensorRT imports (or tpc's plugin), no float64 anywhere, TopK
    with a constant K <= 3840 on float or int32 input, CumSum on float input; raises naming the node."""
    import onnx

    inferred = check_static_graph(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info]}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    types.update({init.name: init.data_type for init in inferred.graph.initializer})
    constants = _constant_values(inferred)
    for node in inferred.graph.node:
        if _is_plugin(node):
            continue
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            raise TensorRTLegalityError(
                f"node '{node.name}' is {node.domain or 'ai.onnx'}::{node.op_type}, which TensorRT's ONNX parser "
                "does not import"
            )
        for name in [*node.input, *node.output]:
            if types.get(name) == _DOUBLE:
                raise TensorRTLegalityError(
                    f"node '{node.name}' ({node.op_type}) uses float64 tensor '{name}'; TensorRT has no float64 "
                    "(its parser casts it to float32, which would change the computation)"
                )
        allowed = INPUT_TYPES.get(node.op_type)
        if allowed is not None and types.get(node.input[0]) not in allowed:
            given = onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))
            raise TensorRTLegalityError(
                f"{node.op_type} node '{node.name}' takes {given} input; TensorRT's takes float32/float16"
                + (" or int32" if _INT32 in allowed else "")
            )
        if node.op_type == "TopK":
            k = int(constants[node.input[1]].reshape(-1)[0])
            if k > MAX_TOPK_K:
                raise TensorRTLegalityError(
                    f"TopK node '{node.name}' has K={k}; TensorRT's TopK takes K <= {MAX_TOPK_K} "
                    "(use --param trt_select=plugin: the fused kernel takes N up to 8192)"
                )


def _token_select_translation() -> dict:
    """The select op as one `tpc::TokenSelect` ONNX node (torch.onnx needs a schema for a custom-domain op)."""
    import onnx
    import onnxscript

    parameter = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        PLUGIN_NAME,
        PLUGIN_NAMESPACE,
        1,
        inputs=[parameter("scores", "T"), parameter("tokens", "T")],
        outputs=[parameter("kept_indices", "tensor(int64)"), parameter("kept_tokens", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "scores and tokens")],
        attributes=[onnx.defs.OpSchema.Attribute("k", onnx.defs.OpSchema.AttrType.INT, "tokens kept per row")],
    )
    token_select = onnxscript.values.Op(onnxscript.values.Opset(PLUGIN_NAMESPACE, 1), PLUGIN_NAME, schema)

    def translate(scores: Any, tokens: Any, k: int) -> Any:
        return token_select(scores, tokens, k=k, _num_outputs=2)

    return {torch.ops.tpc.select_tokens.default: translate}


def insert_plugin_nodes(model: Any) -> tuple[Any, int]:
    """Each `tpc::TokenSelect` node becomes the node TensorRT's parser maps to tpc's plugin: `plugin_namespace`
    and `plugin_version` attributes, kept indices as int32 (what the kernel writes) with a Cast to the graph's
    int64. Returns the model and how many nodes were rewritten."""
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    rewritten = 0
    for node in [n for n in graph.nodes if n.op == PLUGIN_NAME and n.domain == PLUGIN_NAMESPACE]:
        indices = node.outputs[0]
        plugin_indices = gs.Variable(f"{indices.name}__int32", dtype=np.int32, shape=indices.shape)
        node.outputs[0] = plugin_indices
        node.attrs.update({"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION})
        graph.nodes.append(
            gs.Node("Cast", f"{node.name}__to_int64", {"to": onnx.TensorProto.INT64}, [plugin_indices], [indices])
        )
        rewritten += 1
    graph.cleanup().toposort()
    return gs.export_onnx(graph), rewritten


class TensorRTTarget(Target):
    name = "tensorrt"
    suffix = ".onnx"
    extra = "tensorrt"
    requires = ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon")
    runtime = "tensorrt"
    options: ClassVar[dict[str, str]] = {
        "trt_select": "native (TopK + TopK + Gather) | plugin (one TokenSelect node for tpc's CUDA plugin)"
    }
    param_options = ("trt_select",)

    def __init__(self, trt_select: str = "native") -> None:
        if trt_select not in SELECT_LOWERINGS:
            raise UsageError(f"--param trt_select={trt_select}: expected one of {', '.join(SELECT_LOWERINGS)}")
        self.trt_select = trt_select

    def export(
        self, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...], path: Path
    ) -> dict[str, Any]:
        import onnx

        program = export_program(module, inputs)
        plugins = 0
        if self.trt_select == "plugin":
            model = write_onnx(program, inputs, output_names, path, _token_select_translation())
            model, plugins = insert_plugin_nodes(model)
            onnx.save(model, str(path))
        else:
            model = write_onnx(lower_tpc_ops(program, lowering="float32"), inputs, output_names, path)
        check_tensorrt_graph(model)
        return {
            "opset": OPSET,
            "op_counts": op_counts(model),
            "trt_select": self.trt_select,
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
            write_build_script(root, [Path(a.path) for a in artifacts.values()], self.trt_select == "plugin")
        return artifacts


def onnxruntime_check(
    path: Path, module: nn.Module, inputs: dict[str, Tensor], output_names: tuple[str, ...]
) -> dict[str, Any]:
    """The TensorRT-legal graph run by ONNX Runtime on the example inputs against eager: the native lowering's
    exactness is checked here, before any device (the engine is checked by `tpc verify` where TensorRT runs)."""
    import numpy as np

    from tpc.runtimes.onnxruntime import OnnxRuntime

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


def write_build_script(root: Path, onnx_files: list[Path], plugin: bool) -> None:
    """`build_engine.sh`: the exact trtexec commands for every component (fp32 and fp16 engines), building the
    plugin from the copied sources first when the graphs hold TokenSelect nodes. The sources are copied either
    way, so the native export can be switched to the plugin on the device."""
    from tpc.plugins import plugin_sources

    target = root / PLUGIN_DIR
    target.mkdir(parents=True, exist_ok=True)
    for source in plugin_sources():
        shutil.copy2(source, target / source.name)
    load = " --dynamicPlugins=plugin/build/libtpc_trt_plugin.so" if plugin else ""
    lines = [
        "#!/usr/bin/env bash",
        "# Build TensorRT engines for this export on the device that runs them (an engine is specific to the GPU",
        "# and the TensorRT version). Needs TensorRT 10 (trtexec on PATH; JetPack 6: /usr/src/tensorrt/bin).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
    ]
    if plugin:
        lines += [
            "# the TokenSelect plugin (tpc's fused select kernel); on Jetson Orin add -DCMAKE_CUDA_ARCHITECTURES=87",
            'cmake -S plugin -B plugin/build -DTensorRT_ROOT="${TensorRT_ROOT:-/usr}"',
            "cmake --build plugin/build -j",
        ]
    for onnx_file in onnx_files:
        stem = onnx_file.with_suffix("")
        lines.append(f"trtexec --onnx={onnx_file} --saveEngine={stem}.engine{load}")
        lines.append(f"trtexec --onnx={onnx_file} --saveEngine={stem}.fp16.engine --fp16{load}")
    script = root / BUILD_SCRIPT
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
