// pybind11 module kvpress_kernels._C: a thin, torch-free binding over the CUDA launchers.
// Tensors travel as (data pointer, strides) integers and the current stream as an integer;
// every launcher returns a kvpk::Status code, which the Python side turns into an exception.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <string>

#include "kvpress_kernels/launchers.h"

namespace py = pybind11;

static int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

static std::string last_cuda_error_string(int code) {
  return std::string(cudaGetErrorString(static_cast<cudaError_t>(code)));
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpress-kernels torch-free CUDA launchers";
  m.attr("ABI_VERSION") = 1;
  m.def("device_count", &device_count, "Number of CUDA devices visible to the CUDA runtime (0 without a driver).");
  m.def("cuda_error_string", &last_cuda_error_string);
  kvpk_register_launchers(m.ptr());
}
