"""TensorRT runtime: build an engine from the exported TensorRT-legal ONNX (or load the one beside it) and run it.

Only where the `tensorrt` Python package imports and a CUDA GPU is present (Jetson, a workstation); elsewhere
`load` raises `RuntimeUnavailable`, so `tpc verify` says the engine step cannot run here and `--allow-skip`
accepts the checks the export did run. An engine is specific to the GPU and the TensorRT version, so it is
built on the machine that runs it: `<component>.engine` next to the ONNX is reused when present. A graph with
`TokenSelect` plugin nodes needs tpc's plugin library (plugins_cuda/, `TPC_TRT_PLUGIN` or the export's
`plugin/build/libtpc_trt_plugin.so`). Teacher forcing cuts the ONNX before the build, as ONNX Runtime does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import RuntimeUnavailable, UsageError
from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime, TensorIO
from tpc.runtimes.onnxruntime import force_tensors, onnx_io, read_onnx

# The TokenSelect plugin library, as the export's build_engine.sh builds it from the sources the TensorRT target
# copies into PLUGIN_DIR (tpc.exporter.tensorrt reads these names from here: the runtime never imports the exporter)
PLUGIN_DIR = "plugin"
PLUGIN_LIBRARY_NAME = "libtpc_trt_plugin.so"  # plugins_cuda/CMakeLists.txt's target tpc_trt_plugin
PLUGIN_LIBRARY = Path(PLUGIN_DIR) / "build" / PLUGIN_LIBRARY_NAME
UNAVAILABLE = (
    "TensorRT is not installed here (`import tensorrt` fails; pip cannot install it on this machine): the engine "
    "step was skipped. On the device, run build_engine.sh in the export directory, then `tpc verify` there"
)


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailable(UNAVAILABLE) from None
    return tensorrt


def plugin_library(export_dir: Path) -> Path | None:
    """The TokenSelect plugin library: `TPC_TRT_PLUGIN`, else the one build_engine.sh builds in the export."""
    given = os.environ.get("TPC_TRT_PLUGIN")
    if given:
        return Path(given)
    built = export_dir / PLUGIN_LIBRARY
    return built if built.exists() else None


def build_engine(onnx_bytes: bytes, fp16: bool, plugin: Path | None) -> bytes:
    """Serialize an engine for this GPU from an ONNX model (static shapes: no optimization profile needed)."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin is not None:
        trt.get_plugin_registry().load_library(str(plugin))
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build an engine for the graph (see the log above)")
    return bytes(serialized)


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    requires = ("onnx",)  # and tensorrt itself, which `load` reports as unavailable (not installable by pip here)
    extra = "tensorrt"

    def __init__(self, engine: Any, feeds: dict[str, str]) -> None:
        self.engine = engine
        self.context = engine.create_execution_context()
        self.feeds = feeds  # forced output name -> engine input name

    @classmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> TensorRTRuntime:
        """`artifact`: the component's ONNX; its engine is `<stem>.engine` beside it (built and saved if absent;
        a teacher-forced engine is built in memory only)."""
        import onnx

        model = read_onnx(artifact)  # a damaged file is an error on any machine, before the availability check
        trt = _tensorrt()
        artifact = Path(artifact)
        fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
        plugin = plugin_library(artifact.parent)
        feeds: dict[str, str] = {}
        engine_path = artifact.with_suffix(".engine")
        if forced:
            model, feeds = force_tensors(model, forced)
            serialized = build_engine(model.SerializeToString(), fp16, plugin)
        elif engine_path.exists():
            serialized = engine_path.read_bytes()
            if plugin is not None:
                trt.get_plugin_registry().load_library(str(plugin))
        else:
            serialized = build_engine(model.SerializeToString(), fp16, plugin)
            engine_path.write_bytes(serialized)
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
        if engine is None:
            raise UsageError(
                f"'{engine_path}' is not a TensorRT engine this GPU and TensorRT {trt.__version__} can run (built "
                "elsewhere, or damaged); delete it and load again to rebuild it from the ONNX"
            )
        return cls(engine, feeds)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        trt = _tensorrt()
        feed = {self.feeds.get(name, name): value for name, value in inputs.items()}
        outputs: dict[str, torch.Tensor] = {}
        keep_alive = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to("cuda", dtype)
                keep_alive.append(tensor)
            else:
                tensor = outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    @classmethod
    def artifact_io(
        cls, path: Path, method: str | None, want_inputs: TensorIO, want_outputs: TensorIO
    ) -> tuple[TensorIO, TensorIO]:
        """The engine is built from the exported ONNX: its declared I/O."""
        return onnx_io(path)

    @classmethod
    def versions(cls) -> dict[str, str]:
        try:
            import tensorrt
        except ImportError:
            return {}
        return {"tensorrt": tensorrt.__version__}
