/*
 * tpc fused token select: keep the K best of N tokens per row, in ascending index order, and gather their
 * feature rows, in ONE kernel launch. C ABI so that Python (ctypes), the TensorRT plugin and any C/C++ host
 * can call it with raw device pointers.
 *
 * Rule (the same as tpc.ops.select and tpc.ops.reference): per batch row, higher score first; equal scores ->
 * lower index first; NaN below every number (also below -inf); +-inf are ordinary values; -0.0 == +0.0.
 * The K kept indices are written in ascending order, and kept_tokens[b, j] = tokens[b, kept_indices[b, j]].
 * The result is deterministic and bit-exact (a copy; no arithmetic on the tokens).
 */
#ifndef TPC_TOKEN_SELECT_H
#define TPC_TOKEN_SELECT_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dtype codes for scores and tokens */
#define TPC_DTYPE_FLOAT32 0
#define TPC_DTYPE_FLOAT16 1

/* The largest N (tokens per row) one launch handles: 512 threads x 16 scores per thread. */
#define TPC_TOKEN_SELECT_MAX_TOKENS 8192

/* Return codes. 0 is success; every other value names the first bad argument found. */
#define TPC_SELECT_OK 0
#define TPC_SELECT_ERR_NULL_POINTER 1  /* scores, tokens, kept_indices or kept_tokens is NULL (batch > 0) */
#define TPC_SELECT_ERR_DTYPE 2         /* score_dtype or token_dtype is not 0 (float32) or 1 (float16) */
#define TPC_SELECT_ERR_BATCH 3         /* batch < 0 or batch > 65535 */
#define TPC_SELECT_ERR_TOKENS 4        /* n < 1 or n > TPC_TOKEN_SELECT_MAX_TOKENS */
#define TPC_SELECT_ERR_KEEP 5          /* k < 1 or k > n */
#define TPC_SELECT_ERR_DIM 6           /* d < 1, or one token row is 2 GiB or more */
#define TPC_SELECT_ERR_DEVICE 7        /* the current device could not be queried (no GPU / no driver) */
#define TPC_SELECT_ERR_LAUNCH 8        /* the kernel launch failed (cudaGetLastError after the launch) */

/*
 * scores:       (batch, n) float32 or float16, device memory, row-major, contiguous.
 * tokens:       (batch, n, d) float32 or float16, device memory, row-major, contiguous.
 * kept_indices: (batch, k) int32, device memory: the kept token indices, ascending per row.
 * kept_tokens:  (batch, k, d) of token_dtype, device memory.
 * stream:       the CUDA stream to launch on (0 = legacy default stream). The call is asynchronous.
 * batch == 0 is a valid empty problem: nothing is launched and 0 is returned.
 */
int tpc_token_select(const void* scores, int score_dtype, const void* tokens, int token_dtype, int batch, int n,
    int k, int d, int32_t* kept_indices, void* kept_tokens, cudaStream_t stream);

/* A static, NUL-terminated, one-line description of a return code of tpc_token_select. */
const char* tpc_token_select_error_string(int code);

/* TPC_TOKEN_SELECT_MAX_TOKENS, for callers that cannot read this header (ctypes). */
int tpc_token_select_max_tokens(void);

/*
 * How many blocks tpc_token_select launches per batch row for this problem on the current device (each block
 * selects redundantly and copies 1/G of the kept rows); 0 when the arguments are invalid or no device.
 * For benchmarks and tests; the kernel's result does not depend on it.
 */
int tpc_token_select_blocks_per_row(int batch, int n, int k, int d, int token_dtype);

#ifdef __cplusplus
}
#endif

#endif /* TPC_TOKEN_SELECT_H */
