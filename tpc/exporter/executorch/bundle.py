"""A benchmark bundle for phones: what ExecuTorch's `executor_runner` and benchmark apps need, and nothing else.

`tpc export --target executorch --bundle` writes `bundle/` beside the export:
    model.pte          the program (every component a method)
    model.bpte         a BundledProgram: the same program plus, per method, the sample inputs and the eager
                       outputs, so `executor_runner --model_path model.bpte` checks the outputs on the device
    inputs/<method>/   each input as a raw little-endian file, in the method's input order (`--inputs a,b`)
    expected/<method>/ each eager output as a raw file (and expected.npz per method for scripts)
    README.md          the exact commands, for this export's methods and shapes
The bundle is built from the export directory alone (its `.pte`, samples and tpc.json), so it matches what
`tpc verify` checked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tpc.contract.manifest import EXPECTED_FILE, INPUTS_FILE, ComponentSpec, Manifest, inside, read_samples, write_npz

BUNDLE_DIR = "bundle"
BUNDLED_PROGRAM = "model.bpte"


def _raw_files(arrays: dict[str, np.ndarray], names: list[str], where: Path) -> list[str]:
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for position, name in enumerate(names):
        path = where / f"{position}_{name}.bin"
        np.ascontiguousarray(arrays[name]).tofile(path)
        files.append(str(path.relative_to(where.parent.parent)))
    return files


def write_bundle(directory: Path, manifest: Manifest) -> Path:
    """Write `directory/bundle` for an ExecuTorch export; returns the bundle's path."""
    import torch
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    bundle = directory / BUNDLE_DIR
    bundle.mkdir()
    program = manifest.components[0].artifact
    program_path = inside(directory, program, "artifact")  # every path tpc.json names stays inside the export
    shutil.copyfile(program_path, bundle / Path(program).name)
    suites, commands = [], []
    for spec in manifest.methods:
        method = spec.method
        assert method is not None  # every graph of an ExecuTorch export is a named method of its program
        inputs = read_samples(directory, spec.name, INPUTS_FILE)
        expected = read_samples(directory, spec.name, EXPECTED_FILE)
        input_names, output_names = [s.name for s in spec.inputs], [s.name for s in spec.outputs]
        input_files = _raw_files(inputs, input_names, bundle / "inputs" / method)
        _raw_files(expected, output_names, bundle / "expected" / method)
        write_npz(bundle / "expected" / method / "expected.npz", expected)  # read_samples holds no object arrays
        case = MethodTestCase(
            inputs=[torch.from_numpy(inputs[name]) for name in input_names],
            expected_outputs=[torch.from_numpy(expected[name]) for name in output_names],
        )
        suites.append(MethodTestSuite(method_name=method, test_cases=[case]))
        commands.append((spec, input_files))
    bundled = BundledProgram(None, suites, pte_file_path=str(program_path))
    (bundle / BUNDLED_PROGRAM).write_bytes(serialize_from_bundled_program_to_flatbuffer(bundled))
    (bundle / "README.md").write_text(readme(manifest, Path(program).name, commands))
    return bundle


def readme(manifest: Manifest, program: str, commands: list[tuple[ComponentSpec, list[str]]]) -> str:
    model, method, keep = manifest.model["ref"], manifest.method, manifest.keep
    lines = [
        f"# {model}, {method}, keep {keep}: ExecuTorch benchmark bundle",
        "",
        f"`{program}` has {len(commands)} method(s); each runs on XNNPACK with portable kernels for the rest "
        "(the delegation table is in `../tpc.json` and `tpc inspect ..`). Shapes are static:",
        "",
        "| method | inputs | outputs |",
        "|---|---|---|",
    ]
    for spec, _ in commands:
        ins = ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in spec.inputs)
        outs = ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in spec.outputs)
        lines.append(f"| `{spec.method}` | {ins} | {outs} |")
    if manifest.policy is not None and manifest.policy.stages is not None:
        lines += ["", f"A control step runs its graph's two methods: {manifest.policy.stages}."]
    lines += [
        "",
        "## executor_runner (host or `adb shell`)",
        "",
        "Build ExecuTorch's `executor_runner` with XNNPACK, the event tracer and bundled IO "
        "(`-DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_DEVTOOLS=ON -DEXECUTORCH_ENABLE_EVENT_TRACER=ON "
        "-DEXECUTORCH_ENABLE_BUNDLE_IO=ON`; for Android add the NDK toolchain file with `-DANDROID_ABI=arm64-v8a`), "
        "then from this directory:",
        "",
        "```sh",
    ]
    for spec, files in commands:
        lines.append(
            f"executor_runner --model_path {program} --method_name {spec.method} --inputs {','.join(files)} "
            f"--num_executions 50 --etdump_path {spec.method}.etdump"
        )
    lines += [
        "```",
        "",
        f"Check the outputs on the device against eager PyTorch with the bundled program "
        f"(`--model_path {BUNDLED_PROGRAM}`; it carries each method's inputs and expected outputs; the first "
        "method runs unless `--method_name` says otherwise):",
        "",
        "```sh",
    ]
    for spec, _ in commands:
        lines.append(
            f"executor_runner --model_path {BUNDLED_PROGRAM} --method_name {spec.method} "
            "--bundleio_atol 1e-4 --bundleio_rtol 1e-3"
        )
    lines += [
        "```",
        "",
        "Then read a recorded ETDump back into tpc's per-operator table:",
        "",
        "```sh",
        f"tpc profile --etdump {commands[0][0].method}.etdump <this export directory>",
        "```",
        "",
        "## Android benchmark app (minibench) and iOS Benchmark app",
        "",
        "```sh",
        "adb shell mkdir -p /data/local/tmp/minibench",
        f"adb push {program} /data/local/tmp/minibench/",
        "adb shell am start -W -S -n org.pytorch.minibench/org.pytorch.minibench.BenchmarkActivity "
        "--es model_dir /data/local/tmp/minibench --ei num_iter 50",
        "adb shell run-as org.pytorch.minibench cat files/benchmark_results.json",
        "```",
        "",
        f"On iOS, add `{program}` to the Benchmark app's resources (extension/benchmark/apple/Benchmark) and run its "
        "tests. Both apps time `forward` with inputs they fill themselves"
        + (
            "; this export's methods have other names, so time them with `executor_runner` above."
            if all(spec.method != "forward" for spec, _ in commands)
            else "."
        ),
        "",
    ]
    return "\n".join(lines)
