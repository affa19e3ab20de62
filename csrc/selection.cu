// C ABI entry point of the per-row top-k selection (kernel in include/kvpress_kernels/selection.cuh).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kvpress_kernels/api.h"
#include "kvpress_kernels/common.cuh"
#include "kvpress_kernels/selection.cuh"

namespace {

// Dynamic shared memory for staging a row of keys, or 0 when the row does not fit (then the
// kernel re-reads global memory in every pass). Sets the opt-in limit when above the default 48 KiB.
int cache_bytes_for(int64_t num_cols, int device, int64_t* bytes) {
  using namespace kvpk;
  *bytes = 0;
  int optin = 0;
  if (const int status = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, &optin); status != kOk) {
    return status;
  }
  cudaFuncAttributes attr{};
  if (const cudaError_t err = cudaFuncGetAttributes(&attr, selection::select_topk_kernel<true>); err != cudaSuccess) {
    cudaGetLastError();
    return status_from_cuda(err);
  }
  const int64_t want = ceil_div<int64_t>(num_cols, selection::kItems) * selection::kItems * 4;
  if (want + static_cast<int64_t>(attr.sharedSizeBytes) > optin) return kOk;
  if (want > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(selection::select_topk_kernel<true>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(want));
    if (err != cudaSuccess) {
      cudaGetLastError();
      return status_from_cuda(err);
    }
  }
  *bytes = want;
  return kOk;
}

}  // namespace

extern "C" int kvpk_select_topk(const void* scores, int64_t scores_stride_row, int64_t scores_stride_col,
                                int32_t score_dtype, const void* budgets, int64_t budgets_stride, int32_t budgets_bytes,
                                const void* lengths, int64_t lengths_stride, int32_t lengths_bytes, const void* protect,
                                int64_t protect_stride_row, int64_t protect_stride_col, int64_t sink, int64_t recent,
                                void* keep_mask, int64_t mask_stride_row, int64_t mask_stride_col, void* kept_idx,
                                int64_t kept_stride_row, int64_t kept_stride_col, int32_t kept_bytes, int64_t num_rows,
                                int64_t num_cols, int64_t max_kept, int32_t flags, void* stream) {
  using namespace kvpk;
  int32_t score_bytes = 0;
  switch (score_dtype) {
    case KVPK_DTYPE_FLOAT32:
      score_bytes = 4;
      break;
    case KVPK_DTYPE_FLOAT16:
    case KVPK_DTYPE_BFLOAT16:
      score_bytes = 2;
      break;
    default:
      return kUnsupportedDtype;
  }
  if (!valid_index_bytes(budgets_bytes) || !valid_index_bytes(lengths_bytes) || !valid_index_bytes(kept_bytes)) {
    return kUnsupportedDtype;
  }
  // Positions are int32 inside the kernel, with room for the tile loop to step past the end.
  if (num_rows < 0 || num_rows > INT_MAX || num_cols < 0 || num_cols > INT_MAX - 2 * selection::kTile ||
      max_kept < 0 || max_kept > INT_MAX || sink < 0 || recent < 0) {
    return kInvalidArgument;
  }
  if (num_rows == 0) return kOk;
  if (budgets == nullptr || lengths == nullptr || (num_cols > 0 && (scores == nullptr || keep_mask == nullptr)) ||
      (max_kept > 0 && kept_idx == nullptr)) {
    return kInvalidArgument;
  }

  int device = 0;
  if (const int status = current_device(&device); status != kOk) return status;

  selection::Params p{};
  p.scores = static_cast<const char*>(scores);
  p.scores_stride_row = scores_stride_row * score_bytes;
  p.scores_stride_col = scores_stride_col * score_bytes;
  p.score_dtype = score_dtype;
  p.budgets = IndexView1D{budgets, budgets_stride, budgets_bytes};
  p.lengths = IndexView1D{lengths, lengths_stride, lengths_bytes};
  p.protect = static_cast<const uint8_t*>(protect);
  p.protect_stride_row = protect_stride_row;
  p.protect_stride_col = protect_stride_col;
  p.sink = static_cast<int32_t>(sink < num_cols ? sink : num_cols);
  p.recent = static_cast<int32_t>(recent < num_cols ? recent : num_cols);
  p.mask = static_cast<uint8_t*>(keep_mask);
  p.mask_stride_row = mask_stride_row;
  p.mask_stride_col = mask_stride_col;
  p.kept = IndexView2D{kept_idx, kept_stride_row, kept_stride_col, kept_bytes};
  p.num_cols = static_cast<int32_t>(num_cols);
  p.max_kept = static_cast<int32_t>(max_kept);

  int64_t cache_bytes = 0;
  if ((flags & KVPK_SELECT_NO_SMEM_CACHE) == 0 && num_cols > 0) {
    if (const int status = cache_bytes_for(num_cols, device, &cache_bytes); status != kOk) return status;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(num_rows));
  if (cache_bytes > 0) {
    selection::select_topk_kernel<true><<<grid, selection::kThreads, static_cast<size_t>(cache_bytes), s>>>(p);
  } else {
    selection::select_topk_kernel<false><<<grid, selection::kThreads, 0, s>>>(p);
  }
  return launch_status();
}
