"""The TensorRT target, one module per concern:

  target        `TensorRTTarget` and its passes
  options       `TensorRTOptions`: `--param trt_select=native|plugin`
  legality      what TensorRT's ONNX parser imports (`check_tensorrt_graph`, the `tensorrt_legality` pass)
  plugin_nodes  the select op as tpc's plugin node (`insert_plugin_nodes`, the `insert_plugin_nodes` pass)
  plugins       the fused CUDA kernel behind the plugin: its sources, build, ctypes loader and CPU emulation
  build_script  `build_engine.sh`, written into the export

Names are loaded on first use, so `tpc.exporter.tensorrt.plugins` (numpy only) does not import torch.
"""

from __future__ import annotations

from tpc.lazy import lazy_attributes

_EXPORTS = {
    "TensorRTTarget": "target",
    "TensorRTOptions": "options",
    "SELECT_LOWERINGS": "options",
    "onnxruntime_check": "target",
    "MAX_TOPK_K": "legality",
    "SUPPORTED_OPS": "legality",
    "TensorRTLegalityError": "legality",
    "check_tensorrt_graph": "legality",
    "insert_plugin_nodes": "plugin_nodes",
    "PLUGIN_NAME": "plugins",
    "PLUGIN_NAMESPACE": "plugins",
    "PLUGIN_VERSION": "plugins",
    "BUILD_SCRIPT": "build_script",
    "write_build_script": "build_script",
}


__getattr__ = lazy_attributes(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
