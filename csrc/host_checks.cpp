// Host side of the C ABI: status messages, and the device index math run on the CPU.
//
// The kernels' plan and selection logic is written once as host/device functions
// (common.cuh, compaction.cuh, selection.cuh). The functions below drive those same functions
// sequentially on the host, so that the CPU test-suite checks the math of the kernels against the
// PyTorch references on a machine without a GPU. What they cannot check - the warp and block
// machinery around the math - the GPU tests and compute-sanitizer do.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kvpress_kernels/api.h"
#include "kvpress_kernels/common.cuh"
#include "kvpress_kernels/compaction.cuh"
#include "kvpress_kernels/selection.cuh"

extern "C" const char* kvpk_status_string(int status) {
  switch (status) {
    case KVPK_STATUS_OK:
      return "success";
    case KVPK_STATUS_INVALID_ARGUMENT:
      return "invalid argument: a size, stride, element width or null pointer the kernel cannot take";
    case KVPK_STATUS_UNSUPPORTED_DTYPE:
      return "unsupported dtype: an element width or dtype code the kernel does not handle";
    case KVPK_STATUS_NO_DEVICE:
      return "no CUDA device: the CUDA runtime finds no GPU (or no CUDA driver) on this machine";
    default:
      break;
  }
  if (status > KVPK_STATUS_CUDA_ERROR_BASE) {
    const auto err = static_cast<cudaError_t>(status - KVPK_STATUS_CUDA_ERROR_BASE);
    // Per-thread storage: the pointer stays valid until this thread asks again.
    thread_local std::string message;
    message = std::string("CUDA error ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
    return message.c_str();
  }
  return "unknown status code";
}

extern "C" int kvpk_host_compaction_plan(const int32_t* kept_idx, int64_t max_kept, int32_t* new_len,
                                         int32_t* num_moves, int32_t* src, int32_t* dst) {
  using namespace kvpk;
  if (max_kept < 0 || max_kept > INT32_MAX / 2 || (max_kept > 0 && (kept_idx == nullptr || src == nullptr ||
                                                                      dst == nullptr))) {
    return kInvalidArgument;
  }
  auto kept_at = [&](int m) { return kept_idx[m]; };
  const int n = emulated_warp_partition_point(static_cast<int>(max_kept), [&](int m) { return kept_at(m) >= 0; });
  const int staying = emulated_warp_partition_point(n, [&](int m) { return kept_at(m) < n; });
  for (int i = 0; i < n - staying; ++i) {
    src[i] = kept_at(staying + i);
    dst[i] = compaction::hole_slot(i, staying, kept_at);
  }
  *new_len = n;
  *num_moves = n - staying;
  return kOk;
}

extern "C" uint32_t kvpk_host_order_key(float x) { return kvpk::selection::order_key(x); }

extern "C" int64_t kvpk_host_select_row(const float* scores, int64_t num_cols, int64_t budget, int64_t length,
                                        int64_t sink, int64_t recent, const uint8_t* protect, uint8_t* keep_mask,
                                        int32_t* kept_idx, int64_t max_kept) {
  using namespace kvpk::selection;
  const int n_cols = static_cast<int>(num_cols);
  const int len = static_cast<int>(length < 0 ? 0 : (length > num_cols ? num_cols : length));
  const int row_budget = static_cast<int>(budget < 0 ? 0 : (budget > len ? len : budget));
  const int sink_c = static_cast<int>(sink < num_cols ? sink : num_cols);
  const int recent_c = static_cast<int>(recent < num_cols ? recent : num_cols);

  // Keys, exactly as the kernel's compute_key.
  std::vector<uint32_t> keys(static_cast<size_t>(n_cols), 0u);
  int protected_count = 0;
  for (int j = 0; j < len; ++j) {
    const bool prot = protected_position(j, len, sink_c, recent_c) || (protect != nullptr && protect[j] != 0);
    keys[j] = prot ? 0u : order_key(scores[j]) + 1u;
    protected_count += prot ? 1 : 0;
  }

  Threshold thr{kKeepNone, 0};
  bool known = trivial_threshold(row_budget - protected_count, len - protected_count, thr);
  RadixState st{0u, 0u, row_budget - protected_count};
  for (int pass = 0; !known; ++pass) {
    int hist[kBins] = {0};
    for (int j = 0; j < len; ++j) {
      if (radix_matches(keys[j], st)) ++hist[(keys[j] >> radix_shift(pass)) & 0xFFu];
    }
    int through = 0, digit = -1, above = 0, bin = 0;
    for (int b = kBins - 1; b >= 0; --b) {  // the kernel's inclusive scan from the top bin
      through += hist[b];
      if (bin_holds_rank(through, hist[b], st.rank)) {
        digit = b;
        above = through - hist[b];
        bin = hist[b];
      }
    }
    if (digit < 0) return -1;  // unreachable when the invariants hold; the test would see it
    known = radix_advance(st, pass, digit, above, bin, thr);
  }

  int sure_before = 0, tie_before = 0;
  for (int j = 0; j < n_cols; ++j) {
    const bool sure = sure_keep(j < len, keys[j], thr);
    const bool tie = is_tie(keys[j], thr);
    const bool keep = sure || (tie && tie_before < thr.ties);
    keep_mask[j] = keep ? 1 : 0;
    if (keep) {
      const int slot = sure_before + (tie_before < thr.ties ? tie_before : thr.ties);
      if (slot < max_kept) kept_idx[slot] = j;
    }
    sure_before += sure ? 1 : 0;
    tie_before += tie ? 1 : 0;
  }
  const int total = sure_before + (tie_before < thr.ties ? tie_before : thr.ties);
  for (int64_t slot = total; slot < max_kept; ++slot) kept_idx[slot] = -1;
  return total;
}
