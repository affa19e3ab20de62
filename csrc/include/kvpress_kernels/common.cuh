// Shared definitions of the torch-free CUDA kernels: error codes and small device helpers.
// No torch headers here (FlashInfer's rule): kernels take raw pointers, strides and a stream.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace kvpk {

// Error codes returned by every launcher (0 = success). The Python wrapper turns them into
// exceptions that name the problem.
enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,   // a size or stride the kernel cannot handle
  kUnsupportedDtype = 2,  // element size not supported by the kernel
  kCudaError = 3,         // a CUDA runtime error (cudaGetLastError after the launch)
  kNoDevice = 4,          // no CUDA device / driver on this machine
};

inline int check_launch() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : kCudaError;
}

}  // namespace kvpk
