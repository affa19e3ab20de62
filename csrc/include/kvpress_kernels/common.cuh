// Shared pieces of the torch-free CUDA kernels: status codes, strided index views and the
// search helpers of the compaction plan. No torch headers here (FlashInfer's rule): kernels take
// raw pointers, element strides and a stream, and report a status code.
//
// Functions marked KVPK_HD compile for host and device alike, so that the extension can run the
// very same index math on the CPU (see csrc/host_checks.cpp): the CPU test-suite checks it on a
// machine without a GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kvpress_kernels/api.h"

#if defined(__CUDACC__)
#define KVPK_HD __host__ __device__ __forceinline__
#else
#define KVPK_HD inline
#endif

namespace kvpk {

// ---------------------------------------------------------------------------------------------
// Status codes (mirrors the KVPK_STATUS_* values of api.h, which the C ABI returns).
// ---------------------------------------------------------------------------------------------
enum Status : int {
  kOk = KVPK_STATUS_OK,
  kInvalidArgument = KVPK_STATUS_INVALID_ARGUMENT,
  kUnsupportedDtype = KVPK_STATUS_UNSUPPORTED_DTYPE,
  kNoDevice = KVPK_STATUS_NO_DEVICE,
  kCudaErrorBase = KVPK_STATUS_CUDA_ERROR_BASE,
};

// A CUDA runtime error as a status. "No device" and "no driver at all" (a CPU machine: the
// runtime reports an insufficient driver, and the driver version reads 0) become kNoDevice; every
// other error keeps its own code so that the message names it (e.g. a driver older than the
// toolkit that built the extension).
inline int status_from_cuda(cudaError_t err) {
  if (err == cudaSuccess) return kOk;
  if (err == cudaErrorNoDevice) return kNoDevice;
  if (err == cudaErrorInsufficientDriver) {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0) return kNoDevice;
  }
  return kCudaErrorBase + static_cast<int>(err);
}

// The current device, or the status explaining why there is none. Clears the (non-sticky) error
// so that a failed call here does not poison the next CUDA call of the process.
inline int current_device(int* device) {
  const cudaError_t err = cudaGetDevice(device);
  if (err != cudaSuccess) cudaGetLastError();
  return status_from_cuda(err);
}

// Status of the launch just made: a bad configuration is reported by cudaGetLastError at once;
// faults inside the kernel surface at the caller's next synchronisation, as for any CUDA op.
inline int launch_status() { return status_from_cuda(cudaGetLastError()); }

inline int device_attribute(cudaDeviceAttr attr, int device, int* value) {
  const cudaError_t err = cudaDeviceGetAttribute(value, attr, device);
  if (err != cudaSuccess) cudaGetLastError();
  return status_from_cuda(err);
}

// ---------------------------------------------------------------------------------------------
// Strided integer views. Index tensors (page tables, lengths, budgets, kept indices) may be int32
// or int64 and may have any strides; one kernel serves all of them through a warp-uniform branch
// on the width, which costs nothing next to the memory access and keeps the build small.
// ---------------------------------------------------------------------------------------------
struct IndexView1D {
  const void* ptr;
  int64_t stride;  // in elements
  int32_t bytes;   // 4 (int32) or 8 (int64)

  KVPK_HD int64_t load(int64_t i) const {
    return bytes == 8 ? static_cast<const int64_t*>(ptr)[i * stride]
                      : static_cast<int64_t>(static_cast<const int32_t*>(ptr)[i * stride]);
  }
  KVPK_HD void store(int64_t i, int64_t value) const {
    if (bytes == 8) {
      static_cast<int64_t*>(const_cast<void*>(ptr))[i * stride] = value;
    } else {
      static_cast<int32_t*>(const_cast<void*>(ptr))[i * stride] = static_cast<int32_t>(value);
    }
  }
};

struct IndexView2D {
  const void* ptr;
  int64_t stride_row;  // in elements
  int64_t stride_col;  // in elements
  int32_t bytes;       // 4 or 8

  KVPK_HD IndexView1D row(int64_t r) const {
    const char* base = static_cast<const char*>(ptr) + r * stride_row * bytes;
    return IndexView1D{base, stride_col, bytes};
  }
};

inline bool valid_index_bytes(int32_t bytes) { return bytes == 4 || bytes == 8; }

// ---------------------------------------------------------------------------------------------
// Searches. `pred` is monotone on [0, n): true on a prefix, false after it; the result is the
// length of that prefix (std::partition_point on indices).
// ---------------------------------------------------------------------------------------------
template <class Pred>
KVPK_HD int partition_point(int n, Pred pred) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One round of the 32-ary search of warp_partition_point: the answer lies in [lo, hi]; lane l
// probes lo + l * step and `true_count` probes came back true (a prefix of the lanes, as pred is
// monotone). Each round shrinks hi - lo below `step` <= ceil((hi - lo) / 32), so a search over
// K entries takes ceil(log32 K) rounds of one load each instead of log2 K dependent loads. The
// range shrinks strictly even when pred is not monotone (bad input), so the loop always ends.
KVPK_HD int probe_step(int lo, int hi) { return (hi - lo + 31) / 32; }

KVPK_HD void narrow(int& lo, int& hi, int step, int true_count) {
  if (true_count == 0) {  // pred(lo) is false
    hi = lo;
    return;
  }
  const int first_false_probe = lo + true_count * step;
  lo = lo + (true_count - 1) * step + 1;  // one past the last true probe
  hi = hi < first_false_probe ? hi : first_false_probe;
}

#if defined(__CUDACC__)
// partition_point computed by a whole (converged) warp; every lane returns the same value.
template <class Pred>
__device__ __forceinline__ int warp_partition_point(int n, Pred pred) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  int lo = 0, hi = n;
  while (lo < hi) {
    const int step = probe_step(lo, hi);
    const int probe = lo + lane * step;
    const bool is_true = probe < hi && pred(probe);
    narrow(lo, hi, step, __popc(__ballot_sync(0xffffffffu, is_true)));
  }
  return lo;
}
#endif

// The same search with the 32 lanes emulated one after the other (host checks of the round math).
template <class Pred>
inline int emulated_warp_partition_point(int n, Pred pred) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int step = probe_step(lo, hi);
    int true_count = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const int probe = lo + lane * step;
      true_count += (probe < hi && pred(probe)) ? 1 : 0;
    }
    narrow(lo, hi, step, true_count);
  }
  return lo;
}

template <class T>
KVPK_HD T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace kvpk
