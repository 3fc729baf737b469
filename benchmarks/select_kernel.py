"""The fused CUDA token-select kernel vs PyTorch's eager composition, on a GPU.

For every (N, K, D, dtype, batch) of the grid below, three ways to produce the same outputs are timed:

    fused:    plugins_cuda's tpc_token_select, one launch (select + ascending order + gather), through ctypes
    torch:    torch.topk(scores, K) -> torch.sort(indices) -> torch.gather(tokens): the obvious eager composition
              (3 kernels and more; its tie order on CUDA is unspecified, so it is timed, not checked)
    tpc_op:   tpc.ops.select_tokens on CUDA: float64 key + stable argsort + ascending TopK + index_select (exact)

Before timing, the fused kernel's outputs must equal tpc_op's bit for bit (the script exits 1 otherwise).
Timing: CUDA events around each call on the current stream, `--warmup` untimed calls, then `--repeats` timed
calls; the median is reported (`*_ms`: per-call latency as the stream sees it, host-side launch cost included:
one ctypes call for fused, several op dispatches for torch). `*_loop_ms`: events around `--repeats` back-to-back
calls, divided by their number: the time per call while the queue stays full. Bandwidth = bytes the select
must move (B*N scores read, B*K*D tokens read and written, B*K int32 indices written) / median time, and its
fraction of the GPU's peak DRAM bandwidth (from CuPy's device properties: memoryClockRate * 2 * memoryBusWidth / 8,
or else a table of datasheet numbers).

Writes results/select_kernel.json (machine, GPU, peak and its source, every case) and results/select_kernel.png.
Without a CUDA GPU it prints one line and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine

from tpc.exporter.tensorrt import plugins
from tpc.ops import select_tokens

RESULTS = Path(__file__).resolve().parent / "results"
NS = [256, 576, 2880, 8192]
KS = [32, 64, 160, 320, 640]
DS = [1024, 4096]
BATCHES = [1, 3]
DTYPES = {"float16": torch.float16, "float32": torch.float32}

# Peak DRAM bandwidth (bytes/s) from NVIDIA datasheets, used when CuPy is not installed; matched by substring.
DATASHEET_PEAK = {
    "H200": (4.8e12, "NVIDIA H200 datasheet: 4.8 TB/s"),
    "H100 PCIe": (2.0e12, "NVIDIA H100 PCIe datasheet: 2.0 TB/s"),
    "H100 NVL": (3.9e12, "NVIDIA H100 NVL datasheet: 3.9 TB/s"),
    "H100": (3.35e12, "NVIDIA H100 SXM5 datasheet: 3.35 TB/s"),
    "A100-SXM4-80GB": (2.039e12, "NVIDIA A100 80GB SXM datasheet: 2.039 TB/s"),
    "A100 80GB PCIe": (1.935e12, "NVIDIA A100 80GB PCIe datasheet: 1.935 TB/s"),
    "A100": (1.555e12, "NVIDIA A100 40GB datasheet: 1.555 TB/s"),
    "L4": (300e9, "NVIDIA L4 datasheet: 300 GB/s"),
    "T4": (320e9, "NVIDIA T4 datasheet: 320 GB/s"),
    "Orin": (204.8e9, "NVIDIA Jetson AGX Orin 64GB datasheet: 204.8 GB/s"),
}


def peak_bandwidth(name: str) -> tuple[float | None, str]:
    """(bytes/s, where the number comes from) for device 0."""
    try:
        import cupy  # type: ignore[import-not-found]

        props = cupy.cuda.runtime.getDeviceProperties(0)
        peak = props["memoryClockRate"] * 1e3 * 2 * props["memoryBusWidth"] / 8
        if peak > 0:
            return peak, "CuPy getDeviceProperties: memoryClockRate (kHz) * 1e3 * 2 * memoryBusWidth / 8"
    except Exception:  # CuPy absent, or the driver no longer reports the clock (CUDA 13 dropped the field)
        pass
    for key, (peak, source) in DATASHEET_PEAK.items():
        if key in name:
            return peak, source
    return None, f"unknown for '{name}': add it to DATASHEET_PEAK"


def torch_select(scores: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.sort(torch.topk(scores, k, dim=-1).indices, dim=-1).values
    return indices, torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def median_ms(call: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def loop_ms(call: Callable[[], object], repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def moved_bytes(batch: int, n: int, k: int, d: int, element: int) -> int:
    return batch * (n * element + 2 * k * d * element + 4 * k)


def run_case(library: ctypes.CDLL, n: int, k: int, d: int, dtype: str, batch: int, args: argparse.Namespace) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(n * 7919 + k * 31 + d + batch)
    scores = torch.randn(batch, n, generator=generator, device="cuda").to(DTYPES[dtype])
    scores[:, ::5] = torch.round(scores[:, ::5])  # some ties, as attention-derived scores have
    tokens = torch.randn(batch, n, d, generator=generator, device="cuda").to(DTYPES[dtype])
    fused_indices, fused_tokens = plugins.kernel_token_select(library, scores, tokens, k)
    op_indices, op_tokens = select_tokens(scores, tokens, k)
    if not (torch.equal(fused_indices.long(), op_indices) and torch.equal(fused_tokens, op_tokens)):
        raise SystemExit(f"fused kernel differs from tpc.ops.select_tokens at N={n} K={k} D={d} {dtype} B={batch}")
    calls = {
        "fused": lambda: plugins.kernel_token_select(library, scores, tokens, k),
        "torch": lambda: torch_select(scores, tokens, k),
        "tpc_op": lambda: select_tokens(scores, tokens, k),
    }
    times = {name: median_ms(call, args.warmup, args.repeats) for name, call in calls.items()}
    loops = {f"{name}_loop_ms": loop_ms(call, args.repeats) for name, call in calls.items()}
    element = torch.finfo(DTYPES[dtype]).bits // 8
    moved = moved_bytes(batch, n, k, d, element)
    code = plugins.DTYPE_CODES[dtype]
    return {
        "n": n, "k": k, "d": d, "dtype": dtype, "batch": batch, "bytes": moved,
        "blocks_per_row": library.tpc_token_select_blocks_per_row(batch, n, k, d, code),
        **{f"{name}_ms": value for name, value in times.items()},
        **loops,
        "fused_gbps": moved / times["fused"] / 1e6,
        "fused_loop_gbps": moved / loops["fused_loop_ms"] / 1e6,
        "speedup_vs_torch": times["torch"] / times["fused"],
        "speedup_vs_tpc_op": times["tpc_op"] / times["fused"],
    }  # fmt: skip


def describe(row: dict) -> str:
    case = f"N={row['n']:5d} K={row['k']:4d} D={row['d']:5d} {row['dtype']} B={row['batch']}"
    fused = f"fused {row['fused_ms'] * 1e3:8.1f} us ({row['fused_gbps']:7.1f} GB/s, G={row['blocks_per_row']})"
    return f"{case}: {fused}, torch {row['torch_ms'] * 1e3:8.1f} us, tpc op {row['tpc_op_ms'] * 1e3:8.1f} us"


def plot(rows: list[dict], peak: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for dtype, marker in (("float16", "o"), ("float32", "s")):
        chosen = [r for r in rows if r["dtype"] == dtype]
        x = [r["bytes"] for r in chosen]
        axes[0].scatter(x, [r["speedup_vs_torch"] for r in chosen], marker=marker, label=f"vs torch, {dtype}")
        axes[0].scatter(
            x, [r["speedup_vs_tpc_op"] for r in chosen], marker=marker, alpha=0.4, label=f"vs tpc op, {dtype}"
        )
        if peak:
            axes[1].scatter(x, [r["fused_gbps"] * 1e9 / peak for r in chosen], marker=marker, label=dtype)
        else:
            axes[1].scatter(x, [r["fused_gbps"] for r in chosen], marker=marker, label=dtype)
    axes[0].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].set(xscale="log", xlabel="bytes moved per call", ylabel="speedup of the fused kernel (x)")
    axes[0].set_title("fused kernel vs eager compositions")
    axes[1].set(xscale="log", xlabel="bytes moved per call")
    axes[1].set_ylabel("fraction of peak DRAM bandwidth" if peak else "achieved GB/s")
    axes[1].set_title("fused kernel bandwidth")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA GPU (torch.cuda.is_available() is False): the select-kernel benchmark needs one; nothing written"
        )
        return 0
    name = torch.cuda.get_device_name(0)
    arch = plugins.arch_for_capability(torch.cuda.get_device_capability(0))
    with tempfile.TemporaryDirectory(prefix="tpc-select-kernel-") as build:
        library = plugins.load_kernel_library(plugins.build_kernel_library(arch, build_dir=Path(build)))
        rows = []
        for n, k, d, dtype, batch in itertools.product(NS, KS, DS, DTYPES, BATCHES):
            if k <= n:
                rows.append(run_case(library, n, k, d, dtype, batch, args))
                print(describe(rows[-1]))
    peak, source = peak_bandwidth(name)
    for row in rows:
        row["fraction_of_peak"] = row["fused_gbps"] * 1e9 / peak if peak else None
        row["loop_fraction_of_peak"] = row["fused_loop_gbps"] * 1e9 / peak if peak else None
    args.output.mkdir(parents=True, exist_ok=True)
    gpu = {"name": name, "arch": arch, "peak_bytes_per_s": peak, "peak_source": source, "cuda": torch.version.cuda}
    result = {
        "machine": machine(gpu=gpu),
        "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median of CUDA-event times"},
        "rows": rows,
    }
    (args.output / "select_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, peak, args.output / "select_kernel.png")
    print(f"wrote {args.output / 'select_kernel.json'} and {args.output / 'select_kernel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
