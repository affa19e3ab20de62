// pybind11 module kvpress_kernels._C: a thin, torch-free binding over the C ABI of api.h.
// Tensors travel as (data pointer, element strides) integers and the stream as an integer; every
// launcher returns a status code, which kvpress_kernels/_cuda.py turns into an exception using
// status_string(). Importing the module needs no GPU: static cudart, and no CUDA call at import.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "kvpress_kernels/api.h"

namespace py = pybind11;

namespace {

void* as_ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the "no driver" error
    return 0;
  }
  return n;
}

int compact_paged(uintptr_t k_pages, int64_t k_stride_page, int64_t k_stride_slot, int64_t k_head_dim,
                  uintptr_t v_pages, int64_t v_stride_page, int64_t v_stride_slot, int64_t v_head_dim,
                  int32_t elem_bytes, int64_t page_size, uintptr_t pos_pages, int64_t pos_stride_page,
                  int64_t pos_stride_slot, int32_t pos_bytes, uintptr_t page_table, int64_t table_stride_row,
                  int64_t table_stride_col, int32_t table_bytes, uintptr_t lengths, int64_t lengths_stride,
                  int32_t lengths_bytes, uintptr_t kept_idx, int64_t kept_stride_row, int64_t kept_stride_col,
                  int32_t kept_bytes, int64_t num_rows, int64_t max_kept, uintptr_t stream) {
  // The launch is asynchronous and brief; holding the GIL keeps the binding simple.
  return kvpk_compact_paged(as_ptr(k_pages), k_stride_page, k_stride_slot, k_head_dim, as_ptr(v_pages), v_stride_page,
                            v_stride_slot, v_head_dim, elem_bytes, page_size, as_ptr(pos_pages), pos_stride_page,
                            pos_stride_slot, pos_bytes, as_ptr(page_table), table_stride_row, table_stride_col,
                            table_bytes, as_ptr(lengths), lengths_stride, lengths_bytes, as_ptr(kept_idx),
                            kept_stride_row, kept_stride_col, kept_bytes, num_rows, max_kept, as_ptr(stream));
}

int select_topk(uintptr_t scores, int64_t scores_stride_row, int64_t scores_stride_col, int32_t score_dtype,
                uintptr_t budgets, int64_t budgets_stride, int32_t budgets_bytes, uintptr_t lengths,
                int64_t lengths_stride, int32_t lengths_bytes, uintptr_t protect, int64_t protect_stride_row,
                int64_t protect_stride_col, int64_t sink, int64_t recent, uintptr_t keep_mask, int64_t mask_stride_row,
                int64_t mask_stride_col, uintptr_t kept_idx, int64_t kept_stride_row, int64_t kept_stride_col,
                int32_t kept_bytes, int64_t num_rows, int64_t num_cols, int64_t max_kept, int32_t flags,
                uintptr_t stream) {
  return kvpk_select_topk(as_ptr(scores), scores_stride_row, scores_stride_col, score_dtype, as_ptr(budgets),
                          budgets_stride, budgets_bytes, as_ptr(lengths), lengths_stride, lengths_bytes,
                          as_ptr(protect), protect_stride_row, protect_stride_col, sink, recent, as_ptr(keep_mask),
                          mask_stride_row, mask_stride_col, as_ptr(kept_idx), kept_stride_row, kept_stride_col,
                          kept_bytes, num_rows, num_cols, max_kept, flags, as_ptr(stream));
}

// Host checks (see host_checks.cpp): lists in, lists out.
std::tuple<int, std::vector<int32_t>, std::vector<int32_t>> host_compaction_plan(const std::vector<int32_t>& kept) {
  const auto k = static_cast<int64_t>(kept.size());
  std::vector<int32_t> src(kept.size()), dst(kept.size());
  int32_t new_len = 0, moves = 0;
  const int status = kvpk_host_compaction_plan(kept.data(), k, &new_len, &moves, src.data(), dst.data());
  if (status != KVPK_STATUS_OK) throw py::value_error(kvpk_status_string(status));
  src.resize(static_cast<size_t>(moves));
  dst.resize(static_cast<size_t>(moves));
  return {new_len, src, dst};
}

std::tuple<int64_t, std::vector<bool>, std::vector<int32_t>> host_select_row(const std::vector<float>& scores,
                                                                             int64_t budget, int64_t length,
                                                                             int64_t sink, int64_t recent,
                                                                             const std::vector<bool>& protect,
                                                                             int64_t max_kept) {
  const auto n = static_cast<int64_t>(scores.size());
  if (!protect.empty() && static_cast<int64_t>(protect.size()) != n) {
    throw py::value_error("protect must be empty or as long as scores");
  }
  if (max_kept < 0) throw py::value_error("max_kept must be >= 0");
  std::vector<uint8_t> prot(protect.begin(), protect.end());
  std::vector<uint8_t> mask(scores.size(), 0);
  std::vector<int32_t> kept(static_cast<size_t>(max_kept), -1);
  const int64_t total = kvpk_host_select_row(scores.data(), n, budget, length, sink, recent,
                                             protect.empty() ? nullptr : prot.data(), mask.data(), kept.data(),
                                             max_kept);
  return {total, std::vector<bool>(mask.begin(), mask.end()), kept};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpress-kernels torch-free CUDA launchers (C ABI of csrc/include/kvpress_kernels/api.h)";
  m.attr("ABI_VERSION") = KVPK_ABI_VERSION;
  m.attr("STATUS_OK") = KVPK_STATUS_OK;
  m.attr("STATUS_INVALID_ARGUMENT") = KVPK_STATUS_INVALID_ARGUMENT;
  m.attr("STATUS_UNSUPPORTED_DTYPE") = KVPK_STATUS_UNSUPPORTED_DTYPE;
  m.attr("STATUS_NO_DEVICE") = KVPK_STATUS_NO_DEVICE;
  m.attr("STATUS_CUDA_ERROR_BASE") = KVPK_STATUS_CUDA_ERROR_BASE;
  m.attr("DTYPE_FLOAT32") = KVPK_DTYPE_FLOAT32;
  m.attr("DTYPE_FLOAT16") = KVPK_DTYPE_FLOAT16;
  m.attr("DTYPE_BFLOAT16") = KVPK_DTYPE_BFLOAT16;
  m.attr("SELECT_NO_SMEM_CACHE") = KVPK_SELECT_NO_SMEM_CACHE;

  m.def("device_count", &device_count,
        "Number of CUDA devices visible to the CUDA runtime (0 without a GPU or driver).");
  m.def("status_string", [](int status) { return std::string(kvpk_status_string(status)); }, py::arg("status"),
        "Message of a launcher status code (CUDA errors: name and description).");
  m.def("compact_paged", &compact_paged,
        "In-place paged compaction; see kvpk_compact_paged in api.h. Returns a status code.");
  m.def("select_topk", &select_topk, "Per-row top-k selection; see kvpk_select_topk in api.h. Returns a status code.");
  m.def("host_compaction_plan", &host_compaction_plan, py::arg("kept"),
        "The device compaction plan of one row, computed on the CPU by the same code: (new_len, src, dst).");
  m.def("host_order_key", &kvpk_host_order_key, py::arg("x"), "The selection kernel's order-preserving key of a float.");
  m.def("host_select_row", &host_select_row, py::arg("scores"), py::arg("budget"), py::arg("length"), py::arg("sink"),
        py::arg("recent"), py::arg("protect"), py::arg("max_kept"),
        "Selection of one row by the kernel's algorithm run sequentially on the CPU: (kept, keep_mask, kept_idx).");
}
