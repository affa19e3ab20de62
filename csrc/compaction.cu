// C ABI entry point of the in-place paged compaction (kernel in include/kvpress_kernels/compaction.cuh).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kvpress_kernels/api.h"
#include "kvpress_kernels/common.cuh"
#include "kvpress_kernels/compaction.cuh"

extern "C" int kvpk_compact_paged(void* k_pages, int64_t k_stride_page, int64_t k_stride_slot, int64_t k_head_dim,
                                  void* v_pages, int64_t v_stride_page, int64_t v_stride_slot, int64_t v_head_dim,
                                  int32_t elem_bytes, int64_t page_size, void* pos_pages, int64_t pos_stride_page,
                                  int64_t pos_stride_slot, int32_t pos_bytes, const void* page_table,
                                  int64_t table_stride_row, int64_t table_stride_col, int32_t table_bytes,
                                  void* lengths, int64_t lengths_stride, int32_t lengths_bytes, const void* kept_idx,
                                  int64_t kept_stride_row, int64_t kept_stride_col, int32_t kept_bytes,
                                  int64_t num_rows, int64_t max_kept, void* stream) {
  using namespace kvpk;
  if (elem_bytes != 2 && elem_bytes != 4) return kUnsupportedDtype;
  if (!valid_index_bytes(table_bytes) || !valid_index_bytes(lengths_bytes) || !valid_index_bytes(kept_bytes) ||
      (pos_pages != nullptr && !valid_index_bytes(pos_bytes))) {
    return kUnsupportedDtype;
  }
  // Slots and move ranks are int32 inside the kernel; rows index grid.x.
  if (num_rows < 0 || num_rows > INT_MAX || max_kept < 0 || max_kept > INT_MAX / 2 || page_size < 1 ||
      page_size > INT_MAX || k_head_dim < 0 || v_head_dim < 0 || k_head_dim * elem_bytes > INT_MAX / 2 ||
      v_head_dim * elem_bytes > INT_MAX / 2) {
    return kInvalidArgument;
  }
  if (num_rows == 0) return kOk;
  // Pools and page table are dereferenced only for moves, which need pages: empty ones may be NULL.
  if (lengths == nullptr || (max_kept > 0 && kept_idx == nullptr)) return kInvalidArgument;

  int device = 0;
  if (const int status = current_device(&device); status != kOk) return status;
  int sm_count = 0;
  if (const int status = device_attribute(cudaDevAttrMultiProcessorCount, device, &sm_count); status != kOk) {
    return status;
  }

  compaction::Params p{};
  p.k = static_cast<char*>(k_pages);
  p.k_stride_page = k_stride_page * elem_bytes;
  p.k_stride_slot = k_stride_slot * elem_bytes;
  p.v = static_cast<char*>(v_pages);
  p.v_stride_page = v_stride_page * elem_bytes;
  p.v_stride_slot = v_stride_slot * elem_bytes;
  p.pos = static_cast<char*>(pos_pages);
  p.pos_stride_page = pos_stride_page * pos_bytes;
  p.pos_stride_slot = pos_stride_slot * pos_bytes;
  p.pos_bytes = pos_bytes;
  p.page_size = static_cast<int32_t>(page_size);
  p.table = IndexView2D{page_table, table_stride_row, table_stride_col, table_bytes};
  p.lengths = IndexView1D{lengths, lengths_stride, lengths_bytes};
  // With max_kept == 0 no entry is ever read, but the view must still point somewhere harmless.
  p.kept = IndexView2D{kept_idx != nullptr ? kept_idx : lengths, kept_stride_row, kept_stride_col, kept_bytes};
  p.max_kept = static_cast<int32_t>(max_kept);

  const int64_t k_row_bytes = k_head_dim * elem_bytes;
  const int64_t v_row_bytes = v_head_dim * elem_bytes;
  const int width = compaction::vector_bytes(p.k, p.k_stride_page, p.k_stride_slot, k_row_bytes, p.v, p.v_stride_page,
                                             p.v_stride_slot, v_row_bytes, elem_bytes);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (width) {
    case 16:
      return compaction::launch<uint4>(p, k_row_bytes, v_row_bytes, num_rows, max_kept, sm_count, s);
    case 8:
      return compaction::launch<uint2>(p, k_row_bytes, v_row_bytes, num_rows, max_kept, sm_count, s);
    case 4:
      return compaction::launch<uint32_t>(p, k_row_bytes, v_row_bytes, num_rows, max_kept, sm_count, s);
    default:
      return compaction::launch<uint16_t>(p, k_row_bytes, v_row_bytes, num_rows, max_kept, sm_count, s);
  }
}
