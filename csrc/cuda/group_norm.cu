/*
 * group_norm.cu: GroupNorm (+ optional SiLU) on channels-last activations, fp32 statistics.
 *
 *   x, y  [N, HW, C]  pixel stride C, sample strides x_stride_n / y_stride_n
 *   gamma, beta [C] (x's dtype) or NULL;  G groups of cpg = C / G consecutive channels
 *   shift [N, C] (x's dtype, row stride shift_stride_n) or NULL: normalise x' = x + shift[n, c]
 *
 * torch's GroupNorm makes channels-last input contiguous (NCHW) first and returns NCHW,
 * so a channels-last UNet pays a permuting copy before and a cuDNN layout conversion
 * after every GroupNorm. This reads x twice and writes y once, in x's layout:
 *
 *   1. stats     grid (chunks, N), block (CV = C / VEC, R): thread (cv, r) owns the VEC
 *                channels of vector cv and sums, over the pixels r, r + R, ... of its
 *                chunk, d = x - K and d^2 with K = x[n, 0, c] (a per-channel shift, so
 *                the fp32 sums do not cancel when |mean| >> std); the R rows are added in
 *                shared memory; per (n, chunk, c): float2 (S, Q) to the workspace.
 *   2. finalize  grid (G, N): per group, in double, from the channel sums of every chunk:
 *                mean = (sum S + HW sum K) / cnt, M2 = sum over channels of
 *                Q + 2 (K - mean) S + HW (K - mean)^2; float2 (mean, rsqrt(M2 / cnt + eps)).
 *   3. apply     grid-stride over (pixel, vector): y = (x' - mean) * rstd * gamma + beta (+ SiLU).
 * A shift adds a constant per (sample, channel), so the shifted sums of pass 1 are the same
 * for x and x' (the per-channel shift K becomes K + shift[n, c]): only passes 2 and 3 see it.
 *
 * VEC = 16 / sizeof(T) elements per 16-byte access: needs C % VEC == 0 and 16-byte
 * aligned x, y, gamma, beta and sample strides (the launcher checks).
 * Workspace: [N][chunks][C] float2 partials, then [N][G] float2 statistics.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dda.h"
#include "dtype_convert.cuh"
#include "launch_common.cuh"

namespace {


constexpr int kThreads = 256;

/* Layout of the work, the same on host (workspace size, grids) and device. */
struct Plan {
  int vec, cv, rows;        /* elements per vector, vectors per pixel, pixel rows per block */
  int64_t chunks, ppc;      /* chunks per sample, pixels per chunk */
};

Plan make_plan(const dda_group_norm_params *p, int esize) {
  Plan pl;
  pl.vec = 16 / esize;
  pl.cv = static_cast<int>(p->C / pl.vec);
  pl.rows = pl.cv >= kThreads ? 1 : kThreads / pl.cv;
  /* About 512 blocks in all, at least 4 pixels per thread row. */
  int64_t chunks = p->HW / (4 * pl.rows);
  const int64_t cap = (512 + p->N - 1) / p->N;
  if (chunks > cap) chunks = cap;
  if (chunks < 1) chunks = 1;
  pl.ppc = (p->HW + chunks - 1) / chunks;
  pl.chunks = (p->HW + pl.ppc - 1) / pl.ppc;
  return pl;
}

template <typename T>
__global__ void gn_stats(const dda_group_norm_params p, const int64_t ppc, float2 *part) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ float2 red[];  /* [rows][C] */
  const int cv = threadIdx.x, r = threadIdx.y, R = blockDim.y;
  const int64_t n = blockIdx.y, chunk = blockIdx.x;
  const T *x = static_cast<const T *>(p.x) + n * p.x_stride_n;
  const int c0 = cv * V;
  const uint4 kv = *reinterpret_cast<const uint4 *>(x + c0);  /* shift: pixel 0 */
  const T *kt = reinterpret_cast<const T *>(&kv);
  float k[V], s[V], q[V];
#pragma unroll
  for (int e = 0; e < V; ++e) { k[e] = to_f32(kt[e]); s[e] = 0.0f; q[e] = 0.0f; }
  const int64_t p0 = chunk * ppc;
  const int64_t p1 = p0 + ppc < p.HW ? p0 + ppc : p.HW;
  for (int64_t px = p0 + r; px < p1; px += R) {
    const uint4 xv = *reinterpret_cast<const uint4 *>(x + px * p.C + c0);
    const T *xt = reinterpret_cast<const T *>(&xv);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = to_f32(xt[e]) - k[e];
      s[e] += d;
      q[e] = fmaf(d, d, q[e]);
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) red[r * p.C + c0 + e] = make_float2(s[e], q[e]);
  __syncthreads();
  if (r == 0) {
    float2 *out = part + (n * gridDim.x + chunk) * p.C + c0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float2 t = red[c0 + e];
      for (int rr = 1; rr < R; ++rr) {
        const float2 u = red[rr * p.C + c0 + e];
        t.x += u.x;
        t.y += u.y;
      }
      out[e] = t;
    }
  }
}

/* One block per (group, sample): double sums over (chunk, channel of the group). */
template <typename T>
__global__ void gn_finalize(const dda_group_norm_params p, const int64_t chunks, const float2 *part,
                            float2 *stats) {
  const int g = blockIdx.x;
  const int64_t n = blockIdx.y;
  const int cpg = static_cast<int>(p.C / p.G);
  const T *x = static_cast<const T *>(p.x) + n * p.x_stride_n;
  const T *t = p.shift ? static_cast<const T *>(p.shift) + n * p.shift_stride_n : nullptr;
  /* per thread: sum S, sum Q, sum K S over its (chunk, channel) items; sum K, sum K^2 over channels */
  double a[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  const int64_t items = chunks * cpg;
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t ch = i / cpg;
    const int c = g * cpg + static_cast<int>(i % cpg);
    const float2 v = part[(n * chunks + ch) * p.C + c];
    const double k = static_cast<double>(to_f32(x[c])) + (t ? to_f32(t[c]) : 0.0f);
    a[0] += v.x;
    a[1] += v.y;
    a[2] += k * v.x;
    if (ch == 0) {
      a[3] += k;
      a[4] += k * k;
    }
  }
  __shared__ double red[5][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < 5; ++j) {
    double v = a[j];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[j][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double t[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
      for (int j = 0; j < 5; ++j) t[j] += red[j][w];
    const double hw = static_cast<double>(p.HW), cnt = hw * cpg;
    const double mean = (t[0] + hw * t[3]) / cnt;
    /* sum over channels of Q + 2 (K - mean) S + HW (K - mean)^2 */
    double m2 = t[1] + 2.0 * (t[2] - mean * t[0]) + hw * (t[4] - 2.0 * mean * t[3] + cpg * mean * mean);
    if (m2 < 0.0) m2 = 0.0;
    stats[n * p.G + g] = make_float2(static_cast<float>(mean), static_cast<float>(rsqrt(m2 / cnt + p.eps)));
  }
}

template <typename T>
__global__ void gn_apply(const dda_group_norm_params p, const float2 *stats) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ float2 st[];  /* [G] of this sample */
  const int64_t n = blockIdx.y;
  for (int i = threadIdx.x; i < p.G; i += blockDim.x) st[i] = stats[n * p.G + i];
  __syncthreads();
  const T *x = static_cast<const T *>(p.x) + n * p.x_stride_n;
  T *y = static_cast<T *>(p.y) + n * p.y_stride_n;
  const T *gamma = static_cast<const T *>(p.gamma), *beta = static_cast<const T *>(p.beta);
  const T *shift = p.shift ? static_cast<const T *>(p.shift) + n * p.shift_stride_n : nullptr;
  const int cv = static_cast<int>(p.C / V), cpg = static_cast<int>(p.C / p.G);
  const int64_t total = p.HW * cv;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c0 = static_cast<int>(i % cv) * V;
    const int64_t off = (i / cv) * p.C + c0;
    const uint4 xv = *reinterpret_cast<const uint4 *>(x + off);
    const T *xt = reinterpret_cast<const T *>(&xv);
    uint4 gv = make_uint4(0, 0, 0, 0), bv = make_uint4(0, 0, 0, 0);
    if (gamma) gv = *reinterpret_cast<const uint4 *>(gamma + c0);
    if (beta) bv = *reinterpret_cast<const uint4 *>(beta + c0);
    const T *gt = reinterpret_cast<const T *>(&gv), *bt = reinterpret_cast<const T *>(&bv);
    uint4 ov;
    T *o = reinterpret_cast<T *>(&ov);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float2 s = st[(c0 + e) / cpg];
      const float xe = shift ? to_f32(xt[e]) + to_f32(shift[c0 + e]) : to_f32(xt[e]);
      float v = (xe - s.x) * s.y;
      if (gamma) v *= to_f32(gt[e]);
      if (beta) v += to_f32(bt[e]);
      if (p.silu) v = v / (1.0f + __expf(-v));
      o[e] = from_f32<T>(v);
    }
    *reinterpret_cast<uint4 *>(y + off) = ov;
  }
}

int esize_of(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }

bool aligned16(const void *ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
dda_status launch(const dda_group_norm_params *p, float2 *part, float2 *stats, cudaStream_t stream) {
  const Plan pl = make_plan(p, sizeof(T));
  const dim3 sblock(pl.cv, pl.rows);
  const size_t sred = static_cast<size_t>(pl.rows) * p->C * sizeof(float2);
  gn_stats<T><<<dim3(static_cast<unsigned>(pl.chunks), static_cast<unsigned>(p->N)), sblock, sred, stream>>>(
      *p, pl.ppc, part);
  gn_finalize<T><<<dim3(static_cast<unsigned>(p->G), static_cast<unsigned>(p->N)), 256, 0, stream>>>(
      *p, pl.chunks, part, stats);
  const int64_t work = p->HW * pl.cv;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = (2048 + p->N - 1) / p->N;
  if (blocks > cap) blocks = cap;
  gn_apply<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p->N)), kThreads,
                 static_cast<size_t>(p->G) * sizeof(float2), stream>>>(*p, stats);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

}  // namespace

/* What the CUDA kernels take (16-byte channel vectors, at most 1024 of them per pixel;
 * grid and shared-memory limits; 16-byte aligned data and sample strides). */
extern "C" const char *dda_group_norm_supported_cuda(const dda_group_norm_params *p) {
  if (dda_group_norm_check(p) != DDA_OK) return "invalid arguments (null pointer, sizes, groups not dividing C, strides)";
  const int es = esize_of(p->dtype), vec = 16 / es;
  if (p->C % vec != 0 || p->C / vec > 1024)
    return es == 2 ? "the channel count must be a multiple of 8 (at most 8192) for float16/bfloat16"
                   : "the channel count must be a multiple of 4 (at most 4096) for float32";
  if (p->N > 65535 || p->G > 65535) return "more than 65535 samples or groups";
  if (static_cast<int64_t>(p->G) * 8 > 48 * 1024) return "too many groups for the statistics in shared memory";
  const Plan pl = make_plan(p, es);
  if (static_cast<int64_t>(pl.rows) * p->C * 8 > 48 * 1024) return "too many channels for the row sums in shared memory";
  if (!aligned16(p->x) || !aligned16(p->y) || (p->gamma && !aligned16(p->gamma)) || (p->beta && !aligned16(p->beta)))
    return "x, out, weight and bias must be 16-byte aligned (a fresh or .contiguous() tensor is)";
  if ((p->x_stride_n * es) % 16 != 0 || (p->y_stride_n * es) % 16 != 0)
    return "the sample strides must be multiples of 16 bytes";
  return nullptr;
}

extern "C" size_t dda_group_norm_workspace_bytes(const dda_group_norm_params *p) {
  if (dda_group_norm_check(p) != DDA_OK) return 0;
  const Plan pl = make_plan(p, esize_of(p->dtype));
  const size_t parts = static_cast<size_t>(p->N) * pl.chunks * p->C;
  return (parts + static_cast<size_t>(p->N) * p->G) * sizeof(float2);
}

extern "C" dda_status dda_group_norm_cuda(const dda_group_norm_params *p, void *workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  const dda_status st = dda_group_norm_check(p);
  if (st != DDA_OK) return st;
  if (dda_group_norm_supported_cuda(p)) return DDA_ERR_INVALID_ARGUMENT;
  const size_t need = dda_group_norm_workspace_bytes(p);
  if (workspace == nullptr || workspace_bytes < need || !aligned16(workspace)) return DDA_ERR_INVALID_ARGUMENT;
  const Plan pl = make_plan(p, esize_of(p->dtype));
  float2 *part = static_cast<float2 *>(workspace);
  float2 *stats = part + static_cast<size_t>(p->N) * pl.chunks * p->C;
  switch (p->dtype) {
    case DDA_F16: return launch<__half>(p, part, stats, stream);
    case DDA_BF16: return launch<__nv_bfloat16>(p, part, stats, stream);
    default: return launch<float>(p, part, stats, stream);
  }
}
