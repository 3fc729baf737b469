"""`build_engine.sh`: the engines are built on the device (an engine is specific to the GPU and TensorRT version),
from the ONNX files and, for the plugin lowering, the plugin sources copied into the export."""

from __future__ import annotations

import shutil
from pathlib import Path

from tpc.exporter.tensorrt.plugins import plugin_sources
from tpc.runtimes.tensorrt import PLUGIN_DIR, PLUGIN_LIBRARY

BUILD_SCRIPT = "build_engine.sh"


def write_build_script(root: Path, onnx_files: list[Path], plugin: bool) -> None:
    """`build_engine.sh`: the exact trtexec commands for every component (fp32 and fp16 engines), building the
    plugin from the copied sources first when the graphs hold TokenSelect nodes. The sources are copied either
    way, so the native export can be switched to the plugin on the device."""
    target = root / PLUGIN_DIR
    target.mkdir(parents=True, exist_ok=True)
    for source in plugin_sources():
        shutil.copy2(source, target / source.name)
    library, build = PLUGIN_LIBRARY.as_posix(), PLUGIN_LIBRARY.parent.as_posix()
    load = f" --dynamicPlugins={library}" if plugin else ""
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
            f'cmake -S {PLUGIN_DIR} -B {build} -DTensorRT_ROOT="${{TensorRT_ROOT:-/usr}}"',
            f"cmake --build {build} -j",
        ]
    for onnx_file in onnx_files:
        stem = onnx_file.with_suffix("")
        lines.append(f"trtexec --onnx={onnx_file} --saveEngine={stem}.engine{load}")
        lines.append(f"trtexec --onnx={onnx_file} --saveEngine={stem}.fp16.engine --fp16{load}")
    script = root / BUILD_SCRIPT
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
