/*
 * geglu.cu: diffusers' GEGLU activation in one pass, fp32 math.
 *
 *   x [M, 2N] (row stride x_stride_m): the FeedForward projection, value half then gate half
 *   y [M, N]  (row stride y_stride_m): y[m, n] = x[m, n] * gelu(x[m, N + n])
 *
 * Stock diffusers runs chunk -> gelu(gate) -> mul: two strided elementwise kernels and an
 * [M, N] temporary (reads 3 MN, writes 2 MN elements); this reads 2 MN and writes MN once.
 * Vector path: 8 elements (16 bytes) per thread when N % 8 == 0 and x, y and both row
 * strides are 16-byte aligned; otherwise one element per thread. Grid-stride loops.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dda.h"
#include "dtype_convert.cuh"
#include "launch_common.cuh"

namespace {


template <bool APPROX>
__device__ __forceinline__ float gelu(float g) {
  if (APPROX) return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * fmaf(0.044715f * g, g * g, g)));
  return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
}

/* One element per thread. */
template <typename T, bool APPROX>
__global__ void geglu_scalar(const dda_geglu_params p) {
  const T *x = static_cast<const T *>(p.x);
  T *y = static_cast<T *>(p.y);
  const int64_t total = p.M * p.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / p.N, n = i % p.N;
    const T *xr = x + m * p.x_stride_m;
    y[m * p.y_stride_m + n] = from_f32<T>(to_f32(xr[n]) * gelu<APPROX>(to_f32(xr[p.N + n])));
  }
}

/* 16 bytes (16 / sizeof(T) elements) per thread. */
template <typename T, bool APPROX>
__global__ void geglu_vec(const dda_geglu_params p) {
  constexpr int V = 16 / sizeof(T);
  const T *x = static_cast<const T *>(p.x);
  T *y = static_cast<T *>(p.y);
  const int64_t nv = p.N / V;
  const int64_t total = p.M * nv;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / nv, n = (i % nv) * V;
    const T *xr = x + m * p.x_stride_m;
    const uint4 hv = *reinterpret_cast<const uint4 *>(xr + n);
    const uint4 gv = *reinterpret_cast<const uint4 *>(xr + p.N + n);
    const T *h = reinterpret_cast<const T *>(&hv);
    const T *g = reinterpret_cast<const T *>(&gv);
    uint4 ov;
    T *o = reinterpret_cast<T *>(&ov);
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = from_f32<T>(to_f32(h[e]) * gelu<APPROX>(to_f32(g[e])));
    *reinterpret_cast<uint4 *>(y + m * p.y_stride_m + n) = ov;
  }
}

template <typename T, bool APPROX>
dda_status launch(const dda_geglu_params *p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const size_t es = sizeof(T);
  const bool vec = p->N % V == 0 && reinterpret_cast<uintptr_t>(p->x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p->y) % 16 == 0 && (p->x_stride_m * es) % 16 == 0 &&
                   (p->y_stride_m * es) % 16 == 0;
  const int64_t work = vec ? p->M * (p->N / V) : p->M * p->N;
  constexpr int threads = 256;
  const int64_t blocks = (work + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  if (vec) geglu_vec<T, APPROX><<<grid, threads, 0, stream>>>(*p);
  else geglu_scalar<T, APPROX><<<grid, threads, 0, stream>>>(*p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T>
dda_status launch_t(const dda_geglu_params *p, cudaStream_t stream) {
  return p->approximate ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace

extern "C" dda_status dda_geglu_cuda(const dda_geglu_params *p, cudaStream_t stream) {
  const dda_status st = dda_geglu_check(p);
  if (st != DDA_OK) return st;
  switch (p->dtype) {
    case DDA_F16: return launch_t<__half>(p, stream);
    case DDA_BF16: return launch_t<__nv_bfloat16>(p, stream);
    default: return launch_t<float>(p, stream);
  }
}
