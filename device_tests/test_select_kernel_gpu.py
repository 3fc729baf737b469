"""The fused CUDA token-select kernel on a GPU: exactly the select rule, at the shapes tpc's models use.

Builds `libtpc_select.so` for this GPU's architecture (nvcc, warnings as errors), runs it through ctypes on
PyTorch CUDA tensors and compares bit for bit with
  * the numpy reference `tpc.ops.reference.token_select_reference` (the rule's definition), and
  * tpc's own op `tpc.ops.select_tokens` run on CUDA (float64 key + stable argsort: exact on any device).
Grid: N in {256, 576, 2880, 8192}, K in {32, 64, 160, 640} (K <= N), D in {1024, 4096}, float16/float32,
batch 1 and 3, random and tie-heavy scores (NaN, ±inf, -0.0 included); plus odd D and misaligned token buffers
(the 8/4/2-byte copy paths), mixed score/token dtypes, a non-default stream, determinism, and the error codes.

Run on a machine with a CUDA GPU and nvcc: `python -m pytest -q device_tests/test_select_kernel_gpu.py`.
"""

from __future__ import annotations

import ctypes
import zlib
from pathlib import Path

import pytest
import torch

from tpc.errors import UsageError
from tpc.exporter.tensorrt import plugins
from tpc.ops import select_tokens
from tpc.ops.reference import kept_indices_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(plugins.nvcc_path() is None, reason="needs nvcc to build the kernel library"),
]

NS = [256, 576, 2880, 8192]
KS = [32, 64, 160, 640]
DS = [1024, 4096]
DTYPES = {"float16": torch.float16, "float32": torch.float32}
CASES = [(n, k) for n in NS for k in KS if k <= n]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    arch = plugins.arch_for_capability(torch.cuda.get_device_capability())
    path = plugins.build_kernel_library(arch, build_dir=tmp_path_factory.mktemp("kernel"), werror=True)
    return plugins.load_kernel_library(path)


def make_scores(batch: int, n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        return torch.randn(batch, n, generator=generator, device="cuda").to(dtype)
    # tie-heavy: 5 distinct values, so the K-th largest is tied with hundreds of tokens, plus the special values
    scores = torch.randint(0, 5, (batch, n), generator=generator, device="cuda").to(dtype)
    scores[:, ::37] = float("nan")
    scores[:, 5::41] = float("inf")
    scores[:, 9::43] = float("-inf")
    scores[:, 13::47] = -0.0
    return scores


def make_tokens(batch: int, n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed + 1)
    return torch.randn(batch, n, d, generator=generator, device="cuda").to(dtype)


def reference_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.from_numpy(kept_indices_reference(scores.float().cpu().numpy(), k)).to("cuda")


def gathered(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, indices.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize(("n", "k"), CASES)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_kernel_equals_the_reference(
    library: ctypes.CDLL, kind: str, n: int, k: int, d: int, dtype: str, batch: int
) -> None:
    seed = zlib.crc32(f"{kind}-{n}-{k}-{d}-{dtype}-{batch}".encode())
    scores = make_scores(batch, n, DTYPES[dtype], kind, seed)
    tokens = make_tokens(batch, n, d, DTYPES[dtype], seed)
    indices, kept = plugins.kernel_token_select(library, scores, tokens, k)
    torch.cuda.synchronize()
    expected = reference_indices(scores, k)
    assert indices.dtype == torch.int32 and indices.shape == (batch, k)
    assert torch.equal(indices.long(), expected)
    assert kept.dtype == tokens.dtype and kept.shape == (batch, k, d)
    assert torch.equal(kept, gathered(tokens, expected))  # bit-exact copy


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("n", "k"), [(576, 64), (2880, 640), (8192, 640)])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_kernel_equals_tpc_select_op_on_cuda(library: ctypes.CDLL, kind: str, n: int, k: int, dtype: str) -> None:
    scores = make_scores(3, n, DTYPES[dtype], kind, seed=n + k)
    tokens = make_tokens(3, n, 1024, DTYPES[dtype], seed=n + k)
    indices, kept = plugins.kernel_token_select(library, scores, tokens, k)
    op_indices, op_kept = select_tokens(scores, tokens, k)
    assert torch.equal(indices.long(), op_indices)
    assert torch.equal(kept, op_kept)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 1000, 1001])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_odd_rows_and_misaligned_buffers_use_narrower_copies(
    library: ctypes.CDLL, d: int, offset: int, dtype: str
) -> None:
    batch, n, k = 2, 576, 160
    torch_dtype = DTYPES[dtype]
    scores = make_scores(batch, n, torch_dtype, "ties", seed=d)
    storage = torch.randn(batch * n * d + offset, device="cuda").to(torch_dtype)
    tokens = storage[offset:].view(batch, n, d)  # contiguous, but offset by one element from the allocation
    indices, kept = plugins.kernel_token_select(library, scores, tokens, k)
    expected = reference_indices(scores, k)
    assert torch.equal(indices.long(), expected)
    assert torch.equal(kept, gathered(tokens, expected))


@pytest.mark.parametrize(("score_dtype", "token_dtype"), [("float16", "float32"), ("float32", "float16")])
def test_score_and_token_dtypes_are_independent(library: ctypes.CDLL, score_dtype: str, token_dtype: str) -> None:
    scores = make_scores(3, 2880, DTYPES[score_dtype], "ties", seed=3)
    tokens = make_tokens(3, 2880, 1024, DTYPES[token_dtype], seed=3)
    indices, kept = plugins.kernel_token_select(library, scores, tokens, 320)
    expected = reference_indices(scores, 320)
    assert torch.equal(indices.long(), expected)
    assert torch.equal(kept, gathered(tokens, expected))


def test_every_k_on_one_row_including_k_equal_n(library: ctypes.CDLL) -> None:
    scores = make_scores(1, 300, torch.float32, "ties", seed=11)
    tokens = make_tokens(1, 300, 8, torch.float32, seed=11)
    for k in range(1, 301):
        indices, kept = plugins.kernel_token_select(library, scores, tokens, k)
        expected = reference_indices(scores, k)
        assert torch.equal(indices.long(), expected), k
        assert torch.equal(kept, gathered(tokens, expected)), k


def test_deterministic_multi_block_and_on_a_side_stream(library: ctypes.CDLL) -> None:
    batch, n, k, d = 1, 8192, 640, 4096
    blocks = library.tpc_token_select_blocks_per_row(batch, n, k, d, plugins.DTYPE_CODES["float16"])
    assert blocks > 1  # a batch-1 gather is spread over several blocks, each selecting redundantly
    scores = make_scores(batch, n, torch.float16, "ties", seed=5)
    tokens = make_tokens(batch, n, d, torch.float16, seed=5)
    first = plugins.kernel_token_select(library, scores, tokens, k)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        results = [plugins.kernel_token_select(library, scores, tokens, k) for _ in range(5)]
    stream.synchronize()
    for indices, kept in results:
        assert torch.equal(indices, first[0]) and torch.equal(kept, first[1])


def test_error_codes_on_the_gpu(library: ctypes.CDLL) -> None:
    scores = torch.zeros(2, 16, device="cuda")
    tokens = torch.zeros(2, 16, 4, device="cuda")
    out_indices = torch.empty(2, 8, dtype=torch.int32, device="cuda")
    out_tokens = torch.empty(2, 8, 4, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    pointers = (scores.data_ptr(), tokens.data_ptr(), out_indices.data_ptr(), out_tokens.data_ptr())

    def call(score_dtype: int, token_dtype: int, batch: int, n: int, k: int, d: int) -> int:
        s, t, i, o = pointers
        return library.tpc_token_select(s, score_dtype, t, token_dtype, batch, n, k, d, i, o, stream)

    assert call(0, 0, 2, 16, 8, 4) == 0
    assert call(0, 0, 2, 16, 0, 4) == 5
    assert call(0, 0, 2, 16, 17, 4) == 5
    assert call(0, 0, 2, 8193, 8, 4) == 4
    assert call(0, 0, 2, 16, 8, 0) == 6
    assert call(3, 0, 2, 16, 8, 4) == 2
    assert call(0, 0, -1, 16, 8, 4) == 3
    assert library.tpc_token_select(None, 0, None, 0, 2, 16, 8, 4, None, None, stream) == 1
    with pytest.raises(UsageError, match=r"tpc_token_select failed \(5\): k must be in \[1, n\]"):
        plugins.kernel_token_select(library, scores, tokens, 17)
    torch.cuda.synchronize()


def test_the_build_is_cached_where_the_fixture_put_it(library: ctypes.CDLL) -> None:
    path = Path(library._name)
    assert plugins.kernel_library(path.parent) == path
