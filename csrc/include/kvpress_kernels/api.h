/* The C ABI of the kvpress-kernels CUDA launchers.
 *
 * Plain C: pointers, element strides, element widths, sizes and a CUDA stream (as void*). Nothing
 * here knows about torch or Python, so any binding (our pybind11 module, ctypes, another engine)
 * can call it, and one build serves every torch version.
 *
 * Conventions shared by every launcher:
 *  - Strides are in ELEMENTS of the tensor they describe (torch's Tensor.stride()).
 *  - Index tensors (page tables, lengths, budgets, kept indices, positions) are int32 or int64;
 *    their width in bytes (4 or 8) is passed next to them.
 *  - Launches are asynchronous on `stream` (the caller's current stream); the launcher never
 *    synchronises, allocates or reads device memory from the host, so it is CUDA-graph safe.
 *  - The kernel runs on the calling thread's current CUDA device; the caller makes the tensors'
 *    device current.
 *  - Return value: KVPK_STATUS_OK, or a status below. A code >= KVPK_STATUS_CUDA_ERROR_BASE is
 *    KVPK_STATUS_CUDA_ERROR_BASE + cudaError_t of the failing runtime call.
 */
#ifndef KVPRESS_KERNELS_API_H_
#define KVPRESS_KERNELS_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVPK_ABI_VERSION 2

#define KVPK_STATUS_OK 0
#define KVPK_STATUS_INVALID_ARGUMENT 1  /* a size, stride, width or null pointer the kernel cannot take */
#define KVPK_STATUS_UNSUPPORTED_DTYPE 2 /* an element width / dtype code the kernel does not handle */
#define KVPK_STATUS_NO_DEVICE 4         /* no CUDA device or no CUDA driver on this machine */
#define KVPK_STATUS_CUDA_ERROR_BASE 1000

/* Human-readable message of a status code (static storage; never NULL). */
const char* kvpk_status_string(int status);

/* In-place paged compaction (see docs/CUDA.md and kvpress_kernels/ops/compaction.py).
 *
 * Row r of `num_rows` owns pages page_table[r, :]; slot s lives in page page_table[r, s / page_size]
 * at offset s % page_size. kept_idx[r, :max_kept] lists the kept slots, strictly ascending, then -1
 * padding; n = #entries >= 0. The i-th kept slot >= n moves into the i-th non-kept slot < n (K, V
 * and, when pos_pages is not NULL, the position); then lengths[r] = n. `lengths` is only written.
 *
 * k_pages: [num_pages, page_size, k_head_dim] with unit last stride, element width `elem_bytes`
 * (2 or 4: moved as raw bits); likewise v_pages with v_head_dim. pos_pages: [num_pages, page_size]
 * int32/int64 or NULL.
 */
int kvpk_compact_paged(void* k_pages, int64_t k_stride_page, int64_t k_stride_slot, int64_t k_head_dim,
                       void* v_pages, int64_t v_stride_page, int64_t v_stride_slot, int64_t v_head_dim,
                       int32_t elem_bytes, int64_t page_size,
                       void* pos_pages, int64_t pos_stride_page, int64_t pos_stride_slot, int32_t pos_bytes,
                       const void* page_table, int64_t table_stride_row, int64_t table_stride_col,
                       int32_t table_bytes,
                       void* lengths, int64_t lengths_stride, int32_t lengths_bytes,
                       const void* kept_idx, int64_t kept_stride_row, int64_t kept_stride_col, int32_t kept_bytes,
                       int64_t num_rows, int64_t max_kept, void* stream);

/* Score dtypes of kvpk_select_topk. */
#define KVPK_DTYPE_FLOAT32 0
#define KVPK_DTYPE_FLOAT16 1
#define KVPK_DTYPE_BFLOAT16 2

/* kvpk_select_topk flag: never stage the row's keys in shared memory (re-read them from global
 * memory in every pass). For tests of that path; the launcher falls back to it by itself when a
 * row does not fit in shared memory. */
#define KVPK_SELECT_NO_SMEM_CACHE 1

/* Per-row top-k selection with protected tokens (see docs/CUDA.md and ops/selection.py).
 *
 * Row r: len = clamp(lengths[r], 0, num_cols); budget = clamp(budgets[r], 0, len). Protected:
 * j < len and (j < sink or j >= len - recent or protect[r, j]). Kept: every protected token plus
 * the max(budget - #protected, 0) best unprotected j < len, by score descending, ties by lower j,
 * NaN below every number, -0 equal to +0. keep_mask[r, j] (bool, 1 byte) for every j < num_cols;
 * kept_idx[r, :max_kept] the kept positions ascending (the first max_kept of them), then -1.
 * scores: [num_rows, num_cols] of dtype `score_dtype`; protect: [num_rows, num_cols] bool or NULL.
 */
int kvpk_select_topk(const void* scores, int64_t scores_stride_row, int64_t scores_stride_col, int32_t score_dtype,
                     const void* budgets, int64_t budgets_stride, int32_t budgets_bytes,
                     const void* lengths, int64_t lengths_stride, int32_t lengths_bytes,
                     const void* protect, int64_t protect_stride_row, int64_t protect_stride_col,
                     int64_t sink, int64_t recent,
                     void* keep_mask, int64_t mask_stride_row, int64_t mask_stride_col,
                     void* kept_idx, int64_t kept_stride_row, int64_t kept_stride_col, int32_t kept_bytes,
                     int64_t num_rows, int64_t num_cols, int64_t max_kept, int32_t flags, void* stream);

/* Host-side checks of the device index math (same source, run on the CPU; see host_checks.cpp). */

/* The compaction plan of one row: writes *new_len and, for i < *num_moves, src[i] -> dst[i].
 * src/dst must hold max_kept entries. Uses the emulated warp search for n and c. */
int kvpk_host_compaction_plan(const int32_t* kept_idx, int64_t max_kept, int32_t* new_len, int32_t* num_moves,
                              int32_t* src, int32_t* dst);

/* The order-preserving key of a float (NaN -> 0, -0 -> +0's key). */
uint32_t kvpk_host_order_key(float x);

/* Selection of one row by the kernel's algorithm run sequentially on the host (same key mapping,
 * radix passes, early exit and tie rule). protect may be NULL. Writes keep_mask[0:num_cols] and
 * kept_idx[0:max_kept]; returns the number kept. */
int64_t kvpk_host_select_row(const float* scores, int64_t num_cols, int64_t budget, int64_t length, int64_t sink,
                             int64_t recent, const uint8_t* protect, uint8_t* keep_mask, int32_t* kept_idx,
                             int64_t max_kept);

#ifdef __cplusplus
}
#endif

#endif /* KVPRESS_KERNELS_API_H_ */
