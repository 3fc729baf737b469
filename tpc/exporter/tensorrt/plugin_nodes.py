"""The select op as tpc's TensorRT plugin node (`--param trt_select=plugin`).

The op is exported as one `tpc::TokenSelect` ONNX node (`token_select_translation`, a schema torch.onnx needs
for a custom-domain op); then `insert_plugin_nodes` (onnx-graphsurgeon, the `insert_plugin_nodes` pass) gives it
the attributes TensorRT's parser finds the plugin by (`plugin_namespace`, `plugin_version`), int32 kept indices
as the plugin writes them, and a Cast back to int64 for the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tpc.exporter.graph_pass import GraphPass
from tpc.exporter.tensorrt.legality import is_plugin_node
from tpc.exporter.tensorrt.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION


def token_select_translation() -> dict:
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


def _unplugged(model: Any) -> list[str]:
    """Names of the `tpc::TokenSelect` nodes not yet in the plugin's form."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type == PLUGIN_NAME and node.domain == PLUGIN_NAMESPACE and not is_plugin_node(node)
    ]


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


def plugin_node_count(model: Any) -> int:
    return sum(1 for node in model.graph.node if is_plugin_node(node))


class InsertPluginNodes(GraphPass[Any]):
    """`insert_plugin_nodes` on the written ONNX, saved back to `path`; ensures no TokenSelect node is left
    without the plugin's attributes."""

    name = "insert_plugin_nodes"

    def __init__(self, path: Path) -> None:
        self.path = path

    def call(self, model: Any) -> Any:
        import onnx

        model, _ = insert_plugin_nodes(model)
        onnx.save(model, str(self.path))
        return model

    def ensures(self, model: Any) -> None:
        if left := _unplugged(model):
            raise RuntimeError(f"TokenSelect nodes without the plugin's attributes: {', '.join(left)}")
