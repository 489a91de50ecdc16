/* launch_common.cuh: host-side helpers every CUDA launcher shares. */
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "dda.h"

namespace {

/* Records the CUDA error for the glue (dda_last_backend_error) and returns DDA_ERR_CUDA. */
inline dda_status cuda_fail(cudaError_t e) {
  dda_set_backend_error(static_cast<int>(e));
  return DDA_ERR_CUDA;
}

/* Raises `kernel`'s dynamic shared-memory limit to `bytes` once per device: `raised` is the
 * caller's flag word for this kernel instantiation (a function-local static), one bit per
 * device id < 64 (higher ids raise on every call). No stream work: safe during capture. */
template <typename Kernel>
cudaError_t raise_smem_once(Kernel kernel, size_t bytes, std::atomic<unsigned long long> &raised) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const unsigned long long bit = dev < 64 ? 1ull << dev : 0ull;
  if (bit != 0 && (raised.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess) raised.fetch_or(bit, std::memory_order_release);
  return e;
}

}  // namespace
