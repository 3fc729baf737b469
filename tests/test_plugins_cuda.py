"""The fused CUDA token-select kernel and its TensorRT plugin, on a machine without a GPU or TensorRT.

  * the kernel library compiles with nvcc (warnings are errors), exports its C ABI, loads through ctypes without
    a GPU and rejects bad arguments with the documented codes;
  * the CMake project configures and says the TensorRT plugin is skipped when TensorRT is absent;
  * the plugin sources carry what TensorRT looks up (C-linkage getCreators, name/namespace/version, field k);
  * the kernel's algorithm, emulated step by step in numpy (tpc.exporter.tensorrt.plugins.emulate_token_select),
    equals the select rule's reference on tie-heavy, NaN, ±inf and -0.0 scores in float32 and float16.
The kernel itself runs in device_tests/test_select_kernel_gpu.py on a GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tpc.errors import UsageError
from tpc.exporter.tensorrt import plugins
from tpc.ops.reference import token_select_reference

PLUGINS = plugins.plugins_dir()
NVCC = plugins.nvcc_path()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
SYMBOLS = {
    "tpc_token_select",
    "tpc_token_select_error_string",
    "tpc_token_select_max_tokens",
    "tpc_token_select_blocks_per_row",
}
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 65504.0]


@pytest.fixture(scope="module")
def built_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel built once for Jetson Orin (sm_87) with warnings as errors, into a temporary directory."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): cannot compile the kernel")
    return plugins.build_kernel_library("sm_87", build_dir=tmp_path_factory.mktemp("kernel"), werror=True)


# --- the kernel library ----------------------------------------------------------------------------------------


@needs_nvcc
def test_kernel_library_compiles_and_exports_the_c_abi(built_library: Path) -> None:
    assert built_library.is_file() and built_library.name == plugins.LIBRARY_NAME
    assert plugins.kernel_library(built_library.parent) == built_library
    if shutil.which("nm"):
        listed = subprocess.run(["nm", "-D", "--defined-only", str(built_library)], capture_output=True, text=True)
        exported = {line.split()[-1] for line in listed.stdout.splitlines() if " T " in line}
        assert exported >= SYMBOLS
    library = plugins.load_kernel_library(built_library)  # static CUDA runtime: loads without a GPU or driver
    assert library.tpc_token_select_max_tokens() == plugins.MAX_TOKENS == 8192
    declared = re.search(r"int tpc_token_select\((.*?)\);", (PLUGINS / "token_select.h").read_text(), re.S)
    assert declared and len(declared.group(1).split(",")) == len(library.tpc_token_select.argtypes) == 11
    assert library.tpc_token_select_error_string(0) == b"success"


BAD_ARGUMENTS = [
    # (score dtype, token dtype, batch, n, k, d, pointers given) -> code
    ((0, 0, 1, 16, 0, 4, True), 5),  # k < 1
    ((0, 0, 1, 16, 17, 4, True), 5),  # k > n
    ((0, 0, 1, 8193, 8, 4, True), 4),  # n > 8192
    ((0, 0, 1, 0, 1, 4, True), 4),  # n < 1
    ((0, 0, 1, 16, 8, 0, True), 6),  # d < 1
    ((2, 0, 1, 16, 8, 4, True), 2),  # unknown score dtype
    ((0, 5, 1, 16, 8, 4, True), 2),  # unknown token dtype
    ((0, 0, -1, 16, 8, 4, True), 3),  # batch < 0
    ((0, 0, 65536, 16, 8, 4, True), 3),  # batch > gridDim.y
    ((1, 1, 1, 16, 8, 4, False), 1),  # NULL pointers
    ((1, 1, 0, 16, 8, 4, False), 0),  # batch 0: nothing to do, nothing launched
]


@needs_nvcc
@pytest.mark.parametrize(("arguments", "code"), BAD_ARGUMENTS)
def test_kernel_rejects_bad_arguments_before_touching_the_gpu(
    built_library: Path, arguments: tuple[int, int, int, int, int, int, bool], code: int
) -> None:
    library = plugins.load_kernel_library(built_library)
    score_dtype, token_dtype, batch, n, k, d, pointers = arguments
    fake = 256 if pointers else None  # never dereferenced: validation happens first
    result = library.tpc_token_select(fake, score_dtype, fake, token_dtype, batch, n, k, d, fake, fake, None)
    assert result == code
    message = library.tpc_token_select_error_string(result).decode()
    assert message and (code == 0 or "unknown" not in message)


@needs_nvcc
def test_make_rebuilds_when_the_architectures_change(built_library: Path) -> None:
    def dry_run(archs: str) -> str:
        command = ["make", "-n", "-C", str(PLUGINS), f"NVCC={NVCC}", f"BUILD_DIR={built_library.parent}", "WERROR=1"]
        return subprocess.run([*command, f"ARCHS={archs}"], capture_output=True, text=True, check=True).stdout

    assert "token_select.cu" not in dry_run("sm_87")  # what the fixture built: up to date
    assert "arch=compute_90,code=sm_90" in dry_run("sm_90")  # other architectures: rebuilt, not reused


def test_kernel_library_is_absent_until_built(tmp_path: Path) -> None:
    assert plugins.kernel_library(tmp_path) is None


@needs_nvcc
def test_build_failure_is_a_one_line_usage_error_with_the_compiler_output(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"failed \(make exit \d+\).*Unsupported gpu architecture") as error:
        plugins.build_kernel_library("sm_99", build_dir=tmp_path)
    assert "\n" not in str(error.value)


@needs_nvcc
def test_default_architectures_include_orin_a100_h100_and_nvcc_supports_them() -> None:
    line = next(line for line in (PLUGINS / "Makefile").read_text().splitlines() if line.startswith("ARCHS ?="))
    archs = plugins.normalize_archs(line.split("=", 1)[1])
    assert {"sm_80", "sm_87", "sm_90"} <= set(archs)
    supported = subprocess.run([str(NVCC), "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    assert {a.replace("sm_", "compute_") for a in archs} <= set(supported)
    cmake_default = re.search(r"set\(CMAKE_CUDA_ARCHITECTURES ([\d ]+)\)", (PLUGINS / "CMakeLists.txt").read_text())
    assert cmake_default and {"80", "87", "90"} <= set(cmake_default.group(1).split())


@pytest.mark.parametrize(
    ("given_archs", "expected"),
    [("87", ["sm_87"]), ("sm_80 sm_90", ["sm_80", "sm_90"]), ("8.7,9.0", ["sm_87", "sm_90"]), (["sm_90a"], ["sm_90a"])],
)
def test_normalize_archs(given_archs: str | list[str], expected: list[str]) -> None:
    assert plugins.normalize_archs(given_archs) == expected


@pytest.mark.parametrize("bad", ["", "ampere", "sm_8"])
def test_normalize_archs_rejects_names_nvcc_would_not_take(bad: str) -> None:
    with pytest.raises(UsageError, match="sm_XY"):
        plugins.normalize_archs(bad)


def test_arch_for_capability() -> None:
    assert plugins.arch_for_capability((8, 7)) == "sm_87"
    assert plugins.arch_for_capability((9, 0)) == "sm_90"


def test_plugins_dir_override_and_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPC_PLUGINS_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="TPC_PLUGINS_DIR") as error:
        plugins.plugins_dir()
    assert "\n" not in str(error.value)
    (tmp_path / "token_select.cu").write_text("// stand-in\n")
    assert plugins.plugins_dir() == tmp_path


def test_plugin_sources_are_what_an_export_must_copy(tmp_path: Path) -> None:
    names = {path.name for path in plugins.plugin_sources()}
    assert names >= {
        "token_select.h",
        "token_select.cu",
        "TokenSelectPlugin.h",
        "TokenSelectPlugin.cpp",
        "CMakeLists.txt",
        "Makefile",
        "README.md",
    }
    assert not any(name.endswith((".so", ".o", ".a")) for name in names)


# --- the TensorRT plugin sources ---------------------------------------------------------------------------------


def test_plugin_sources_carry_what_tensorrt_looks_up() -> None:
    header = (PLUGINS / "TokenSelectPlugin.h").read_text()
    source = (PLUGINS / "TokenSelectPlugin.cpp").read_text()
    code = header + source
    # Dynamic loading (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins) finds these C-linkage symbols.
    assert re.search(
        r'extern "C" nvinfer1::IPluginCreatorInterface\* const\* getCreators\(int32_t& nbCreators\)\s*\{', source
    )
    assert re.search(r'extern "C" void setLoggerFinder\(nvinfer1::ILoggerFinder\* finder\)\s*\{', source)
    # The registry key and the creator field, as the ONNX parser and tpc's exporter spell them.
    assert f'kTokenSelectName = "{plugins.PLUGIN_NAME}"' in header
    assert f'kTokenSelectNamespace = "{plugins.PLUGIN_NAMESPACE}"' in header
    assert f'kTokenSelectVersion = "{plugins.PLUGIN_VERSION}"' in header
    assert f'kTokenSelectFieldK = "{plugins.PLUGIN_FIELD_K}"' in header
    assert "mFieldNames.emplace_back(kTokenSelectFieldK, nullptr, PluginFieldType::kINT32, 1)" in source
    assert "mFieldsToSerialize.emplace_back(kTokenSelectFieldK, &mK, PluginFieldType::kINT32, 1)" in source
    for interface in ("IPluginV3", "IPluginV3OneCore", "IPluginV3OneBuild", "IPluginV3OneRuntime"):
        assert f"public nvinfer1::{interface}" in header
    assert "class TokenSelectCreator : public nvinfer1::IPluginCreatorV3One" in header
    # Static registration with the namespace the creator reports, only in the static build.
    assert re.search(
        r"#ifdef TPC_TRT_STATIC_REGISTRATION.*registerCreator\(creator, kTokenSelectNamespace\).*#endif", source, re.S
    )
    # Outputs: int32 indices and the tokens' dtype; enqueue hands everything to the C ABI.
    assert "outputTypes[0] = DataType::kINT32;" in source and "outputTypes[1] = inputTypes[1];" in source
    assert "tpc_token_select(inputs[0]" in source
    assert "static_assert(NV_TENSORRT_MAJOR >= 10" in code


@pytest.mark.skipif(shutil.which("cmake") is None or NVCC is None, reason="needs cmake and nvcc")
def test_cmake_configures_and_skips_the_plugin_without_tensorrt(tmp_path: Path) -> None:
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(PLUGINS),
            "-B",
            str(tmp_path),
            f"-DCMAKE_CUDA_COMPILER={NVCC}",
            "-DCMAKE_CUDA_ARCHITECTURES=87",
        ],
        capture_output=True,
        text=True,
    )
    assert configure.returncode == 0, configure.stderr[-2000:]
    if "building libtpc_trt_plugin" in configure.stdout:
        pytest.skip("TensorRT is installed here: the plugin would be built, not skipped")
    assert "skipping libtpc_trt_plugin; set -DTensorRT_ROOT=<prefix> to build it" in configure.stdout
    targets = subprocess.run(["cmake", "--build", str(tmp_path), "--target", "help"], capture_output=True, text=True)
    assert "tpc_select" in targets.stdout and "tpc_trt_plugin" not in targets.stdout


# --- the kernel's algorithm, emulated ------------------------------------------------------------------------------


def test_score_keys_order_like_the_rule() -> None:
    ordered = [np.nan, -np.inf, -65504.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 65504.0, np.inf]  # ascending under the rule
    for dtype in (np.float32, np.float16):
        values = np.array(ordered, dtype=dtype)
        distinct = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]  # 1e-30 is 0 in float16
        keys = plugins.score_keys(np.array(distinct, dtype=dtype)).astype(np.int64)
        assert keys[0] == 0 and (np.diff(keys) > 0).all(), (dtype, keys)
        zeros = plugins.score_keys(np.array([-0.0, 0.0, np.nan, -np.nan], dtype=dtype))
        assert zeros[0] == zeros[1] and zeros[2] == zeros[3] == 0
    assert (plugins.score_keys(np.ones(4, dtype=np.float16)) & 0xFFFF == 0).all()  # two radix passes suffice


def test_radix_select_finds_the_kth_largest_key_and_the_ties_kept() -> None:
    keys = plugins.score_keys(np.array([3, 1, 2, 2, 2, 0, 2], dtype=np.float32))
    threshold, remaining = plugins.radix_select(keys, 3, passes=4)
    assert threshold == plugins.score_keys(np.array([2], dtype=np.float32))[0]
    assert remaining == 2  # one key above the threshold; two of the four 2s are kept
    assert plugins.kept_slots(keys, threshold, remaining).tolist() == [0, 2, 3]


def score_arrays(dtype: type, batch: int, tokens: int, ties: bool) -> st.SearchStrategy[np.ndarray]:
    """Tie-heavy scores (a pool of 3 values incl. NaN/±inf/±0) or specials mixed with arbitrary floats."""
    width = 32 if dtype is np.float32 else 16
    if ties:
        element: st.SearchStrategy[float] = st.sampled_from([0.0, -0.0, 1.0, np.nan, np.inf, -np.inf])
    else:
        element = st.one_of(st.sampled_from(SPECIAL), st.floats(width=width, allow_nan=True, allow_infinity=True))
    return arrays(dtype, (batch, tokens), elements=element)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_emulated_kernel_equals_the_select_reference(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from([np.float32, np.float16]))
    batch = data.draw(st.integers(1, 2))
    n = data.draw(st.integers(1, 300))
    k = data.draw(st.integers(1, n))
    ties = data.draw(st.booleans())
    scores = data.draw(score_arrays(dtype, batch, n, ties))
    if ties:  # a small pool leaves only a few distinct values: put some structure across thread chunks
        scores[:, :: data.draw(st.integers(1, 40))] = data.draw(st.sampled_from([0.0, 2.0, np.nan]))
    tokens = np.arange(batch * n * 2, dtype=np.float32).reshape(batch, n, 2)
    indices, kept = plugins.emulate_token_select(scores, tokens, k)
    expected_indices, expected_tokens = token_select_reference(scores, tokens, k)
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(kept, expected_tokens)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_emulated_kernel_at_the_token_limit_with_ties_across_thread_chunks(dtype: type) -> None:
    rng = np.random.default_rng(7)
    n, k = plugins.MAX_TOKENS, 640
    scores = rng.integers(0, 50, size=(2, n)).astype(dtype)  # ~164 copies of each value: the K-th is tied
    scores[0, ::97] = np.nan
    scores[1, ::89] = np.inf
    scores[1, 1::89] = -0.0
    tokens = rng.standard_normal((2, n, 3)).astype(dtype)
    indices, kept = plugins.emulate_token_select(scores, tokens, k)
    expected_indices, expected_tokens = token_select_reference(scores, tokens, k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(kept, expected_tokens)


def test_emulation_rejects_what_the_kernel_rejects() -> None:
    with pytest.raises(ValueError, match="k <= N <= 8192"):
        plugins.emulate_token_select(np.zeros((1, 4), np.float32), np.zeros((1, 4, 1), np.float32), 5)
    with pytest.raises(ValueError, match="float32 or float16"):
        plugins.emulate_token_select(np.zeros((1, 4), np.float64), np.zeros((1, 4, 1), np.float32), 2)


def test_kernel_wrapper_refuses_cpu_tensors_with_a_usage_error() -> None:
    import torch

    with pytest.raises(UsageError, match="one CUDA device, got cpu, cpu"):
        plugins.kernel_token_select(None, torch.zeros(1, 4), torch.zeros(1, 4, 2), 2)  # type: ignore[arg-type]
