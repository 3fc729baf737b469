/*
 * Fused token select: one launch does select + ascending order + gather (see token_select.h for the contract and
 * docs/tensorrt_plugin.md for the design).
 *
 * Grid (G, batch), 512 threads per block. Every block of a row redundantly finds the row's selection in O(N)
 * (the row's scores are at most 32 KB and are read from L2 after the first block), then copies its 1/G share of
 * the K kept token rows. Redundant selection costs each block a few microseconds of on-chip work but needs no
 * second launch and no global synchronisation, and it lets a batch-1 gather use the whole GPU.
 *
 * Selection per row, with keys that order exactly like the rule (an order-preserving uint32 per score, NaN -> 0):
 *   1. radix select: the K-th largest key T, 8 bits per pass from the top (4 passes for float32 keys, 2 for
 *      float16 keys, whose low 16 bits are zero), with shared-memory histograms;
 *   2. R = the number of keys equal to T that are kept = K - #{key > T};
 *   3. token i is kept iff key_i > T, or key_i == T and fewer than R tokens with key == T precede it;
 *   4. its output slot = #{kept tokens before i} = #{key > T before i} + min(#{key == T before i}, R): one
 *      block-wide exclusive scan of (ties, greater) counts packed in one uint32.
 * Every step is integer counting, so the result does not depend on thread scheduling: histogram atomics add
 * counts, and nothing is ordered by an atomic.
 */
#include "token_select.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace
{

constexpr int kBlock = 512;                      // threads per block
constexpr int kItems = 16;                       // scores per thread, contiguous ("blocked" layout)
constexpr int kMaxTokens = kBlock * kItems;      // 8192
constexpr int kWarps = kBlock / 32;
constexpr int kBins = 256;                       // 8-bit radix digits
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kUnroll = 4;                       // 16-byte copies in flight per lane
constexpr long long kMinBytesPerBlock = 16384;   // below this a block's copy share is not worth its selection
constexpr int kBlocksPerSmTarget = 2;            // grid size target: one wave of this many blocks per SM
constexpr int kMaxBatch = 65535;                 // gridDim.y

static_assert(kMaxTokens == TPC_TOKEN_SELECT_MAX_TOKENS, "header and kernel disagree on the token limit");
static_assert(kItems % 4 == 0, "keys are moved from shared memory as uint4");

// Order-preserving keys: a > b as scores (under the rule) <=> key(a) > key(b) as unsigned integers.
// NaN -> 0 (below -inf, whose key is 0x007FFFFF); -0.0 -> the key of +0.0; positive x -> bits | sign bit;
// negative x -> ~bits (larger magnitude, smaller key). Integer only: no dependence on FTZ or FP modes.
template <typename T>
struct ScoreKey;

template <>
struct ScoreKey<float>
{
    static constexpr int kPasses = 4;
    __device__ static uint32_t key(float score)
    {
        uint32_t bits = __float_as_uint(score);
        uint32_t const magnitude = bits & 0x7FFFFFFFu;
        if (magnitude > 0x7F800000u)
        {
            return 0u;
        }
        if (magnitude == 0u)
        {
            bits = 0u;
        }
        return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    }
};

// float16 keys use the same mapping on the 16 half bits, placed in the top 16 bits: half -> float is exact and
// monotone, so this orders (and ties) exactly like comparing the scores as floats, and two passes decide T.
template <>
struct ScoreKey<__half>
{
    static constexpr int kPasses = 2;
    __device__ static uint32_t key(__half score)
    {
        uint32_t bits = __half_as_ushort(score);
        uint32_t const magnitude = bits & 0x7FFFu;
        if (magnitude > 0x7C00u)
        {
            return 0u;
        }
        if (magnitude == 0u)
        {
            bits = 0u;
        }
        uint32_t const key16 = (bits & 0x8000u) ? (~bits & 0xFFFFu) : (bits | 0x8000u);
        return key16 << 16;
    }
};

__device__ __forceinline__ uint32_t warpInclusiveSum(uint32_t value, int lane)
{
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1)
    {
        uint32_t const other = __shfl_up_sync(kFullMask, value, offset);
        if (lane >= offset)
        {
            value += other;
        }
    }
    return value;
}

// Warp 0: find the digit d such that (#keys with the prefix and digit > d) < remaining <= (... digit >= d).
// Lane l owns bins 255 - 8l .. 248 - 8l (descending), so a prefix sum over lanes counts keys from the top.
// Also zeroes the histogram for the next pass (only warp 0 reads it).
__device__ __forceinline__ void findDigit(
    uint32_t* hist, uint32_t remaining, int lane, uint32_t* digitOut, uint32_t* remainingOut)
{
    uint32_t count[8];
    uint32_t sum = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        count[i] = hist[kBins - 1 - (lane * 8 + i)];
        sum += count[i];
    }
    uint32_t above = warpInclusiveSum(sum, lane) - sum;
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        if (above < remaining && above + count[i] >= remaining)
        {
            *digitOut = static_cast<uint32_t>(kBins - 1 - (lane * 8 + i));
            *remainingOut = remaining - above;
        }
        above += count[i];
        hist[kBins - 1 - (lane * 8 + i)] = 0u;
    }
}

// Exclusive prefix sum over the block's threads, in thread order.
__device__ __forceinline__ uint32_t blockExclusiveSum(uint32_t value, uint32_t* warpTotals, int lane, int warp)
{
    uint32_t const inclusive = warpInclusiveSum(value, lane);
    if (lane == 31)
    {
        warpTotals[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0)
    {
        uint32_t total = lane < kWarps ? warpTotals[lane] : 0u;
        total = warpInclusiveSum(total, lane);
        if (lane < kWarps)
        {
            warpTotals[lane] = total;
        }
    }
    __syncthreads();
    return (warp > 0 ? warpTotals[warp - 1] : 0u) + inclusive - value;
}

// Copy K rows of `rowUnits` CopyT each; this block copies output rows [first, last).
template <typename CopyT>
__device__ __forceinline__ void copyRows(CopyT const* __restrict__ source, CopyT* __restrict__ destination,
    int32_t const* kept, int first, int last, int rowUnits, int lane, int warp)
{
    if (rowUnits >= 32)
    {
        // One warp per row, kUnroll loads in flight per lane before the stores.
        for (int r = first + warp; r < last; r += kWarps)
        {
            CopyT const* from = source + static_cast<size_t>(kept[r]) * rowUnits;
            CopyT* to = destination + static_cast<size_t>(r) * rowUnits;
            for (int c0 = lane; c0 < rowUnits; c0 += 32 * kUnroll)
            {
                CopyT value[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                {
                    int const c = c0 + 32 * u;
                    if (c < rowUnits)
                    {
                        value[u] = from[c];
                    }
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u)
                {
                    int const c = c0 + 32 * u;
                    if (c < rowUnits)
                    {
                        to[c] = value[u];
                    }
                }
            }
        }
    }
    else
    {
        // Short rows: spread (row, unit) pairs over all threads.
        int const total = (last - first) * rowUnits;
        for (int e = threadIdx.x; e < total; e += kBlock)
        {
            int const r = first + e / rowUnits;
            int const c = e - (r - first) * rowUnits;
            destination[static_cast<size_t>(r) * rowUnits + c] = source[static_cast<size_t>(kept[r]) * rowUnits + c];
        }
    }
}

template <typename ScoreT, typename CopyT>
__global__ void __launch_bounds__(kBlock) tokenSelectKernel(ScoreT const* __restrict__ scores,
    CopyT const* __restrict__ tokens, int n, int k, int rowUnits, int32_t* __restrict__ keptIndices,
    CopyT* __restrict__ keptTokens)
{
    // Dynamic shared memory: the row's keys (n uint32, rounded up to 4), later reused for the kept list (k <= n).
    extern __shared__ uint4 sharedRaw[];
    uint32_t* keys = reinterpret_cast<uint32_t*>(sharedRaw);
    int32_t* kept = reinterpret_cast<int32_t*>(sharedRaw);
    __shared__ uint32_t hist[kBins];
    __shared__ uint32_t warpTotals[kWarps];
    __shared__ uint32_t sharedDigit;
    __shared__ uint32_t sharedRemaining;

    int const row = blockIdx.y;
    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;

    // 1. Keys: coalesced global loads into shared memory, then each thread takes 16 consecutive keys.
    ScoreT const* rowScores = scores + static_cast<size_t>(row) * n;
    for (int i = tid; i < n; i += kBlock)
    {
        keys[i] = ScoreKey<ScoreT>::key(rowScores[i]);
    }
    for (int i = tid; i < kBins; i += kBlock)
    {
        hist[i] = 0u;
    }
    __syncthreads();
    int const first = tid * kItems;
    int const valid = min(max(n - first, 0), kItems);
    uint32_t item[kItems];
#pragma unroll
    for (int q = 0; q < kItems / 4; ++q)
    {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (first + 4 * q < n)
        {
            v = sharedRaw[first / 4 + q];
        }
        item[4 * q + 0] = v.x;
        item[4 * q + 1] = v.y;
        item[4 * q + 2] = v.z;
        item[4 * q + 3] = v.w;
    }

    // 2. Radix select the K-th largest key: after the passes, threshold = T and remaining = #{key == T} kept.
    uint32_t prefix = 0u;
    uint32_t mask = 0u;
    uint32_t remaining = static_cast<uint32_t>(k);
#pragma unroll
    for (int pass = 0; pass < ScoreKey<ScoreT>::kPasses; ++pass)
    {
        int const shift = 24 - 8 * pass;
#pragma unroll
        for (int j = 0; j < kItems; ++j)
        {
            bool const counted = j < valid && (item[j] & mask) == prefix;
            uint32_t const digit = counted ? (item[j] >> shift) & 0xFFu : static_cast<uint32_t>(kBins);
            // Lanes with the same digit add once: same-address shared atomics would serialise.
            uint32_t const peers = __match_any_sync(kFullMask, digit);
            if (counted && lane == __ffs(peers) - 1)
            {
                atomicAdd(&hist[digit], static_cast<uint32_t>(__popc(peers)));
            }
        }
        __syncthreads();
        if (warp == 0)
        {
            findDigit(hist, remaining, lane, &sharedDigit, &sharedRemaining);
        }
        __syncthreads();
        prefix |= sharedDigit << shift;
        mask |= 0xFFu << shift;
        remaining = sharedRemaining;
    }
    uint32_t const threshold = prefix;

    // 3. Slots: exclusive scan of this thread's (ties, greater) counts; both totals are <= 8192 < 2^16.
    uint32_t greater = 0u;
    uint32_t ties = 0u;
#pragma unroll
    for (int j = 0; j < kItems; ++j)
    {
        if (j < valid)
        {
            greater += item[j] > threshold ? 1u : 0u;
            ties += item[j] == threshold ? 1u : 0u;
        }
    }
    uint32_t const before = blockExclusiveSum((ties << 16) | greater, warpTotals, lane, warp);
    uint32_t tiesBefore = before >> 16;
    uint32_t slot = (before & 0xFFFFu) + min(tiesBefore, remaining);
    bool const writesIndices = blockIdx.x == 0;
    int32_t* rowIndices = keptIndices + static_cast<size_t>(row) * k;
#pragma unroll
    for (int j = 0; j < kItems; ++j)
    {
        if (j < valid)
        {
            bool keep = item[j] > threshold;
            if (item[j] == threshold)
            {
                keep = tiesBefore < remaining;
                ++tiesBefore;
            }
            if (keep)
            {
                kept[slot] = first + j; // the keys were read into registers before the passes' barriers
                if (writesIndices)
                {
                    rowIndices[slot] = first + j;
                }
                ++slot;
            }
        }
    }
    __syncthreads();

    // 4. Gather this block's share of the kept rows.
    int const rowFirst = static_cast<int>(static_cast<long long>(k) * blockIdx.x / gridDim.x);
    int const rowLast = static_cast<int>(static_cast<long long>(k) * (blockIdx.x + 1) / gridDim.x);
    copyRows(tokens + static_cast<size_t>(row) * n * rowUnits, keptTokens + static_cast<size_t>(row) * k * rowUnits,
        kept, rowFirst, rowLast, rowUnits, lane, warp);
}

int dtypeSize(int dtype)
{
    return dtype == TPC_DTYPE_FLOAT32 ? 4 : dtype == TPC_DTYPE_FLOAT16 ? 2 : 0;
}

int checkArguments(int scoreDtype, int tokenDtype, int batch, int n, int k, int d)
{
    if (dtypeSize(scoreDtype) == 0 || dtypeSize(tokenDtype) == 0)
    {
        return TPC_SELECT_ERR_DTYPE;
    }
    if (batch < 0 || batch > kMaxBatch)
    {
        return TPC_SELECT_ERR_BATCH;
    }
    if (n < 1 || n > kMaxTokens)
    {
        return TPC_SELECT_ERR_TOKENS;
    }
    if (k < 1 || k > n)
    {
        return TPC_SELECT_ERR_KEEP;
    }
    if (d < 1 || static_cast<long long>(d) * dtypeSize(tokenDtype) > 0x7FFFFFFFLL)
    {
        return TPC_SELECT_ERR_DIM;
    }
    return TPC_SELECT_OK;
}

// Multiprocessor count of the current device, cached per device (the benign race writes the same value).
int multiprocessorCount()
{
    constexpr int kMaxDevices = 64;
    static int cached[kMaxDevices] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess)
    {
        return 0;
    }
    if (device >= 0 && device < kMaxDevices && cached[device] > 0)
    {
        return cached[device];
    }
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1)
    {
        return 0;
    }
    if (device >= 0 && device < kMaxDevices)
    {
        cached[device] = count;
    }
    return count;
}

// Blocks per row: enough blocks in all to fill the GPU once, but no block with less than kMinBytesPerBlock
// of rows to copy and no more blocks than kept rows.
int blocksPerRow(int batch, int k, long long rowBytes, int multiprocessors)
{
    long long const byGpu = (static_cast<long long>(kBlocksPerSmTarget) * multiprocessors + batch - 1) / batch;
    long long const byBytes = static_cast<long long>(k) * rowBytes / kMinBytesPerBlock;
    long long blocks = byGpu < byBytes ? byGpu : byBytes;
    blocks = blocks < k ? blocks : k;
    return static_cast<int>(blocks < 1 ? 1 : blocks);
}

bool aligned(void const* pointer, size_t bytes)
{
    return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

template <typename ScoreT, typename CopyT>
int launch(void const* scores, void const* tokens, int batch, int n, int k, long long rowBytes,
    int32_t* keptIndices, void* keptTokens, int blocks, cudaStream_t stream)
{
    dim3 const grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
    size_t const sharedBytes = static_cast<size_t>((n + 3) / 4) * sizeof(uint4); // <= 32 KB: no opt-in needed
    tokenSelectKernel<ScoreT, CopyT><<<grid, kBlock, sharedBytes, stream>>>(static_cast<ScoreT const*>(scores),
        static_cast<CopyT const*>(tokens), n, k, static_cast<int>(rowBytes / static_cast<long long>(sizeof(CopyT))),
        keptIndices, static_cast<CopyT*>(keptTokens));
    return cudaGetLastError() == cudaSuccess ? TPC_SELECT_OK : TPC_SELECT_ERR_LAUNCH;
}

// The widest copy unit (16, 8, 4 or 2 bytes) that divides a token row and aligns both token buffers.
template <typename ScoreT>
int launchForRow(void const* scores, void const* tokens, int batch, int n, int k, long long rowBytes,
    int32_t* keptIndices, void* keptTokens, int blocks, cudaStream_t stream)
{
    auto fits = [&](size_t unit) {
        return rowBytes % static_cast<long long>(unit) == 0 && aligned(tokens, unit) && aligned(keptTokens, unit);
    };
    if (fits(16))
    {
        return launch<ScoreT, uint4>(scores, tokens, batch, n, k, rowBytes, keptIndices, keptTokens, blocks, stream);
    }
    if (fits(8))
    {
        return launch<ScoreT, uint2>(scores, tokens, batch, n, k, rowBytes, keptIndices, keptTokens, blocks, stream);
    }
    if (fits(4))
    {
        return launch<ScoreT, uint32_t>(
            scores, tokens, batch, n, k, rowBytes, keptIndices, keptTokens, blocks, stream);
    }
    return launch<ScoreT, uint16_t>(scores, tokens, batch, n, k, rowBytes, keptIndices, keptTokens, blocks, stream);
}

} // namespace

extern "C" int tpc_token_select(void const* scores, int score_dtype, void const* tokens, int token_dtype, int batch,
    int n, int k, int d, int32_t* kept_indices, void* kept_tokens, cudaStream_t stream)
{
    int const status = checkArguments(score_dtype, token_dtype, batch, n, k, d);
    if (status != TPC_SELECT_OK)
    {
        return status;
    }
    if (batch == 0)
    {
        return TPC_SELECT_OK;
    }
    if (scores == nullptr || tokens == nullptr || kept_indices == nullptr || kept_tokens == nullptr)
    {
        return TPC_SELECT_ERR_NULL_POINTER;
    }
    int const multiprocessors = multiprocessorCount();
    if (multiprocessors == 0)
    {
        return TPC_SELECT_ERR_DEVICE;
    }
    long long const rowBytes = static_cast<long long>(d) * dtypeSize(token_dtype);
    int const blocks = blocksPerRow(batch, k, rowBytes, multiprocessors);
    if (score_dtype == TPC_DTYPE_FLOAT32)
    {
        return launchForRow<float>(scores, tokens, batch, n, k, rowBytes, kept_indices, kept_tokens, blocks, stream);
    }
    return launchForRow<__half>(scores, tokens, batch, n, k, rowBytes, kept_indices, kept_tokens, blocks, stream);
}

extern "C" char const* tpc_token_select_error_string(int code)
{
    switch (code)
    {
    case TPC_SELECT_OK: return "success";
    case TPC_SELECT_ERR_NULL_POINTER: return "a device pointer (scores, tokens, kept_indices, kept_tokens) is NULL";
    case TPC_SELECT_ERR_DTYPE: return "dtype must be 0 (float32) or 1 (float16)";
    case TPC_SELECT_ERR_BATCH: return "batch must be in [0, 65535]";
    case TPC_SELECT_ERR_TOKENS: return "n (tokens per row) must be in [1, 8192]";
    case TPC_SELECT_ERR_KEEP: return "k must be in [1, n]";
    case TPC_SELECT_ERR_DIM: return "d must be >= 1 and one token row under 2 GiB";
    case TPC_SELECT_ERR_DEVICE: return "no CUDA device could be queried (cudaGetDevice/cudaDeviceGetAttribute failed)";
    case TPC_SELECT_ERR_LAUNCH: return "the token-select kernel launch failed (cudaGetLastError)";
    default: return "unknown tpc_token_select error code";
    }
}

extern "C" int tpc_token_select_max_tokens(void)
{
    return kMaxTokens;
}

extern "C" int tpc_token_select_blocks_per_row(int batch, int n, int k, int d, int token_dtype)
{
    if (checkArguments(TPC_DTYPE_FLOAT32, token_dtype, batch, n, k, d) != TPC_SELECT_OK || batch == 0)
    {
        return 0;
    }
    int const multiprocessors = multiprocessorCount();
    if (multiprocessors == 0)
    {
        return 0;
    }
    return blocksPerRow(batch, k, static_cast<long long>(d) * dtypeSize(token_dtype), multiprocessors);
}
