"""The fused CUDA token-select kernel of `plugins_cuda/` behind the TensorRT plugin: find it, build it, load it, and
emulate it on the CPU; the plugin's identity (name, namespace, version, field) as the C++ sources declare it.

Why this module exists:
  * the TensorRT target ships the kernel and its IPluginV3 wrapper as sources (a TensorRT plugin must be
    compiled against the TensorRT and CUDA of the machine that runs it, a Jetson for instance), so an export
    needs to know which files to copy (`plugin_sources`);
  * machines with nvcc can build the kernel library alone (`build_kernel_library`, no TensorRT needed) and
    run it through ctypes on PyTorch CUDA tensors (`load_kernel_library`, `kernel_token_select`): that is
    how the kernel is tested on a GPU (device_tests/) and benchmarked (benchmarks/select_kernel.py);
  * machines without a GPU can still test the kernel's *algorithm*: `emulate_token_select` runs the kernel's
    steps (integer key mapping, 8-bit radix select of the K-th largest key, tie ranks, one block-wide
    exclusive scan per row, the blocked thread layout) in numpy, and tests check it against the rule's
    reference `tpc.ops.reference.token_select_reference`.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError

LIBRARY_NAME = "libtpc_select.so"  # the kernel alone (C ABI, nvcc only): what ctypes loads
# the plugin as TensorRT's registry knows it (plugins_cuda/TokenSelectPlugin.h; tests check they agree)
PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, PLUGIN_FIELD_K = "TokenSelect", "tpc", "1", "k"
SOURCES_DIR = "plugins_cuda"  # the checkout's folder with the sources (next to tpc/)
BUILD_DIR = "build"  # where make and cmake build inside it

# The kernel's geometry (token_select.cu): what the emulation mirrors.
THREADS_PER_BLOCK = 512
ITEMS_PER_THREAD = 16
MAX_TOKENS = THREADS_PER_BLOCK * ITEMS_PER_THREAD  # 8192
RADIX_BITS = 8
DTYPE_CODES = {"float32": 0, "float16": 1}

_SOURCE_SUFFIXES = {".h", ".cu", ".cpp"}
_SOURCE_NAMES = {"CMakeLists.txt", "Makefile", "README.md"}
_ARCH = re.compile(r"^(?:sm_)?(\d{2,3}[af]?)$")


def plugins_dir() -> Path:
    """The `plugins_cuda` directory: `$TPC_PLUGINS_DIR`, else the checkout's `plugins_cuda/` next to `tpc/`."""
    configured = os.environ.get("TPC_PLUGINS_DIR")
    checkout = Path(__file__).resolve().parents[3]  # tpc/exporter/tensorrt/plugins.py -> the repository root
    directory = Path(configured) if configured else checkout / SOURCES_DIR
    if not (directory / "token_select.cu").is_file():
        raise UsageError(
            f"CUDA plugin sources not found in {directory}: set TPC_PLUGINS_DIR to a tpc checkout's plugins_cuda "
            "directory (the TensorRT plugin ships as sources in the repository, not in the Python package)"
        )
    return directory


def nvcc_path() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def normalize_archs(archs: str | Sequence[str]) -> list[str]:
    """'87', 'sm_87', '8.7', 'sm_80 sm_90', 'sm_80,sm_90' or a list of those -> ['sm_87', ...]."""
    tokens = re.split(r"[\s,;]+", archs.strip()) if isinstance(archs, str) else [str(a).strip() for a in archs]
    normalized = []
    for token in filter(None, tokens):
        match = _ARCH.match(token.replace(".", ""))
        if not match:
            raise UsageError(f"unknown CUDA architecture '{token}': use sm_XY (e.g. sm_87 for Jetson Orin, sm_90)")
        normalized.append(f"sm_{match.group(1)}")
    if not normalized:
        raise UsageError("no CUDA architecture given: use sm_XY (e.g. sm_87 for Jetson Orin, sm_90)")
    return normalized


def arch_for_capability(capability: tuple[int, int]) -> str:
    """(major, minor) compute capability, as `torch.cuda.get_device_capability()` returns it -> 'sm_XY'."""
    return f"sm_{capability[0]}{capability[1]}"


def default_build_dir() -> Path:
    return plugins_dir() / BUILD_DIR


def kernel_library(build_dir: Path | None = None) -> Path | None:
    """The built kernel library, or None if it has not been built yet."""
    library = (build_dir or default_build_dir()) / LIBRARY_NAME
    return library if library.is_file() else None


def build_kernel_library(
    archs: str | Sequence[str] | None = None, build_dir: Path | None = None, werror: bool = False
) -> Path:
    """Build `libtpc_select.so` with `make -C plugins_cuda` (nvcc alone) and return its path.

    `archs` defaults to the Makefile's list; `werror` turns every compiler warning into an error.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise UsageError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): install the CUDA toolkit to build")
    make = shutil.which("make")
    if make is None:
        raise UsageError("make not found: install make (build-essential) to build the CUDA kernel library")
    source = plugins_dir()
    target = (build_dir or source / BUILD_DIR).resolve()
    command = [make, "-C", str(source), f"NVCC={nvcc}", f"BUILD_DIR={target}"]
    if archs is not None:
        command.append(f"ARCHS={' '.join(normalize_archs(archs))}")
    if werror:
        command.append("WERROR=1")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-6:])
        raise UsageError(f"building {LIBRARY_NAME} failed (make exit {result.returncode}): {tail}")
    return target / LIBRARY_NAME


def plugin_sources() -> list[Path]:
    """The files a TensorRT export copies so that the plugin can be built on the target: headers, CUDA and C++
    sources, CMakeLists.txt, Makefile, README.md (no build outputs)."""
    directory = plugins_dir()
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and (path.suffix in _SOURCE_SUFFIXES or path.name in _SOURCE_NAMES)
    )


def load_kernel_library(path: Path) -> ctypes.CDLL:
    """ctypes handle on a built kernel library with the C ABI's argument and result types set."""
    library = ctypes.CDLL(str(path))
    library.tpc_token_select.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    library.tpc_token_select.restype = ctypes.c_int
    library.tpc_token_select_error_string.argtypes = [ctypes.c_int]
    library.tpc_token_select_error_string.restype = ctypes.c_char_p
    library.tpc_token_select_max_tokens.argtypes = []
    library.tpc_token_select_max_tokens.restype = ctypes.c_int
    library.tpc_token_select_blocks_per_row.argtypes = [ctypes.c_int] * 5
    library.tpc_token_select_blocks_per_row.restype = ctypes.c_int
    return library


def kernel_token_select(library: ctypes.CDLL, scores: Any, tokens: Any, k: int) -> tuple[Any, Any]:
    """Run the kernel on contiguous torch CUDA tensors on the current stream: (kept_indices int32 (B, k), kept_tokens
    (B, k, D)). Raises UsageError with the kernel's message on a nonzero return code."""
    import torch

    dtype_codes = {torch.float32: DTYPE_CODES["float32"], torch.float16: DTYPE_CODES["float16"]}
    if scores.dtype not in dtype_codes or tokens.dtype not in dtype_codes:
        raise UsageError(f"the CUDA kernel takes float32/float16 scores and tokens, got {scores.dtype}, {tokens.dtype}")
    if not (scores.is_cuda and tokens.is_cuda and scores.device == tokens.device):
        raise UsageError(
            f"the CUDA kernel needs scores and tokens on one CUDA device, got {scores.device}, {tokens.device}"
        )
    if scores.dim() != 2 or tokens.dim() != 3 or tokens.shape[:2] != scores.shape:
        raise UsageError(f"need scores (B, N) and tokens (B, N, D), got {tuple(scores.shape)}, {tuple(tokens.shape)}")
    scores, tokens = scores.contiguous(), tokens.contiguous()
    batch, n, d = tokens.shape
    indices = torch.empty((batch, k), dtype=torch.int32, device=tokens.device)
    kept = torch.empty((batch, k, d), dtype=tokens.dtype, device=tokens.device)
    with torch.cuda.device(tokens.device):  # the library launches on the current device
        code = library.tpc_token_select(
            scores.data_ptr(), dtype_codes[scores.dtype], tokens.data_ptr(), dtype_codes[tokens.dtype],
            batch, n, k, d, indices.data_ptr(), kept.data_ptr(), torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
    if code != 0:
        raise UsageError(f"tpc_token_select failed ({code}): {library.tpc_token_select_error_string(code).decode()}")
    return indices, kept


# --- CPU emulation of the kernel's algorithm -------------------------------------------------------------------


def score_keys(scores: np.ndarray) -> np.ndarray:
    """The kernel's order-preserving uint32 keys: NaN -> 0, -0.0 -> +0.0, negative -> ~bits, else bits | sign.
    float16 uses the same mapping on its 16 bits, shifted into the top half (so its low 16 key bits are 0)."""
    scores = np.ascontiguousarray(scores)
    if scores.dtype == np.float32:
        bits, sign, magnitude_mask, infinity, shift = scores.view(np.uint32), 0x80000000, 0x7FFFFFFF, 0x7F800000, 0
    elif scores.dtype == np.float16:
        bits, sign, magnitude_mask, infinity, shift = (
            scores.view(np.uint16).astype(np.uint32),
            0x8000,
            0x7FFF,
            0x7C00,
            16,
        )
    else:
        raise ValueError(f"the kernel takes float32 or float16 scores, got {scores.dtype}")
    all_ones = np.uint32(sign | magnitude_mask)
    magnitude = bits & np.uint32(magnitude_mask)
    bits = np.where(magnitude == 0, np.uint32(0), bits)
    keys = np.where(bits & np.uint32(sign), ~bits & all_ones, bits | np.uint32(sign))
    keys = np.where(magnitude > infinity, np.uint32(0), keys)
    return (keys.astype(np.uint32) << np.uint32(shift)).astype(np.uint32)


def radix_passes(dtype: np.dtype) -> int:
    """4 passes of 8 bits for float32 keys; 2 for float16 keys (their low 16 bits are zero)."""
    return 4 if np.dtype(dtype) == np.float32 else 2


def radix_select(keys: np.ndarray, k: int, passes: int) -> tuple[int, int]:
    """(T, R): the k-th largest key T of one row, and R = how many keys equal to T are kept (k - #{key > T}).

    Per pass: a 256-bin histogram of the next 8 bits of the keys that share the prefix found so far, then the
    digit where the count of keys from the top first reaches the remaining rank."""
    prefix, mask, remaining = 0, 0, k
    for pass_index in range(passes):
        shift = 32 - RADIX_BITS * (pass_index + 1)
        candidates = keys[(keys & np.uint32(mask)) == np.uint32(prefix)]
        histogram = np.bincount(((candidates >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int64), minlength=256)
        from_top = np.cumsum(histogram[::-1])  # from_top[j]: keys whose digit >= 255 - j
        j = int(np.searchsorted(from_top, remaining))  # first j with from_top[j] >= remaining
        digit = 255 - j
        above = int(from_top[j] - histogram[digit])
        prefix |= digit << shift
        mask |= 0xFF << shift
        remaining -= above
    return prefix, remaining


def kept_slots(keys: np.ndarray, threshold: int, remaining: int) -> np.ndarray:
    """The row's kept indices in output-slot order, computed as the kernel's threads do: thread t owns keys
    [16t, 16t + 16); an exclusive scan over threads of (ties << 16 | greater) gives each thread the number of
    greater and tied keys before its chunk; a tie is kept while fewer than R ties precede it."""
    n = len(keys)
    threads = -(-n // ITEMS_PER_THREAD)
    padded = np.zeros(threads * ITEMS_PER_THREAD, dtype=np.uint32)
    padded[:n] = keys
    valid = (np.arange(padded.size) < n).reshape(threads, ITEMS_PER_THREAD)
    chunks = padded.reshape(threads, ITEMS_PER_THREAD)
    greater = ((chunks > threshold) & valid).sum(axis=1).astype(np.uint32)
    ties = ((chunks == threshold) & valid).sum(axis=1).astype(np.uint32)
    packed = (ties << np.uint32(16)) | greater
    before = np.concatenate([[0], np.cumsum(packed, dtype=np.uint64)[:-1]]).astype(np.uint32)
    kept = np.full(int(greater.sum()) + remaining, -1, dtype=np.int64)
    for thread in range(threads):
        ties_before = int(before[thread] >> 16)
        slot = int(before[thread] & 0xFFFF) + min(ties_before, remaining)
        for item in range(ITEMS_PER_THREAD):
            index = thread * ITEMS_PER_THREAD + item
            if index >= n:
                break
            keep = bool(keys[index] > threshold)
            if keys[index] == threshold:
                keep = ties_before < remaining
                ties_before += 1
            if keep:
                kept[slot] = index
                slot += 1
    return kept


def emulate_token_select(scores: np.ndarray, tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What `tpc_token_select` computes, in numpy: (kept_indices (B, k) int32 ascending, kept_tokens (B, k, D))."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or tokens.ndim != 3 or tokens.shape[:2] != scores.shape:
        raise ValueError(f"need scores (B, N) and tokens (B, N, D), got {scores.shape} and {tokens.shape}")
    n = scores.shape[1]
    if not 1 <= n <= MAX_TOKENS or not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N <= {MAX_TOKENS}, got k={k}, N={n}")
    keys = score_keys(scores)
    rows = []
    for row_keys in keys:
        threshold, remaining = radix_select(row_keys, k, radix_passes(scores.dtype))
        slots = kept_slots(row_keys, threshold, remaining)
        if len(slots) != k or (slots < 0).any():
            raise AssertionError(f"emulated kernel filled {np.count_nonzero(slots >= 0)} of {k} slots")
        rows.append(slots)
    indices = np.stack(rows).astype(np.int32)
    return indices, np.take_along_axis(tokens, indices[:, :, None].astype(np.int64), axis=1)
