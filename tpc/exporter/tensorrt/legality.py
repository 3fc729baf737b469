"""What TensorRT's ONNX parser takes: `check_tensorrt_graph` fails the export, naming the node, when a graph breaks
the rules, so a lowering regression surfaces at export and not on the robot (the `tensorrt_legality` pass)."""

from __future__ import annotations

from typing import Any

from tpc.exporter.graph_pass import CheckPass
from tpc.exporter.onnx import StaticShapeError, check_static_graph
from tpc.exporter.tensorrt.plugins import PLUGIN_NAME

MAX_TOPK_K = 3840  # TensorRT's TopK layer: K <= 3840 (ITopKLayer documentation)

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


def is_plugin_node(node: Any) -> bool:
    """A TokenSelect node TensorRT's parser maps to tpc's plugin (it carries `plugin_namespace`)."""
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
        if is_plugin_node(node):
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


class TensorRTLegality(CheckPass[Any]):
    """The written ONNX is one TensorRT's parser imports (`check_tensorrt_graph`, TensorRTLegalityError)."""

    name = "tensorrt_legality"

    def check(self, model: Any) -> None:
        check_tensorrt_graph(model)
