/*
 * group_norm.cu: GroupNorm (+ optional SiLU) on channels-last activations, fp32 statistics.
 *
 *   x, y  [N, HW, C]  pixel stride C, sample strides x_stride_n / y_stride_n
 *   gamma, beta [C] (x's dtype) or NULL;  G groups of cpg = C / G consecutive channels
 *   shift [N, C] (x's dtype, row stride shift_stride_n) or NULL: normalise x' = x + shift[n, c]
 *
 * torch's GroupNorm makes channels-last input contiguous (NCHW) first and returns NCHW,
 * so a channels-last UNet pays a permuting copy before and a cuDNN layout conversion
 * after every GroupNorm. This reads x twice and writes y once, in x's layout, with a memset
 * of the block counters and two kernels:
 *
 *   1. stats  grid (chunks, N), block (CV = C / VEC, R): thread (cv, r) owns the VEC
 *             channels of vector cv and sums, over the pixels r, r + R, ... of its chunk,
 *             d = x - x[n, 0, c] and d^2 in fp32 (the per-channel shift keeps the sums from
 *             cancelling when |mean| >> std); the R rows are added in shared memory, giving the
 *             chunk's (S, Q) per channel. With K = x[n, 0, c] + shift[n, c], the block writes per
 *             group the triple (sum S, sum Q, sum K S) over the group's channels, in double.
 *             The last block of a sample to finish (a ticket counter per sample) combines the
 *             sample's triples over its chunks, in double, and writes the statistics:
 *               mean = (sum S + HW sum K) / cnt,  cnt = HW cpg,
 *               M2 = sum Q + 2 (sum KS - mean sum S) + HW (sum K^2 - 2 mean sum K + cpg mean^2),
 *               float2 (mean, rsqrt(M2 / cnt + eps)).
 *             Above kOneLevelTriples triples per sample, the chunks form bundles of about
 *             sqrt(chunks): the last block of each bundle combines the bundle's triples, and
 *             the last of those (a second counter per sample) combines the bundle sums, so no
 *             block reads more than about max(bundle, bundles) x G triples.
 *   2. apply  grid-stride over (pixel, vector): y = (x' - mean) * rstd * gamma + beta (+ SiLU).
 * A shift adds a constant per (sample, channel): the shifted fp32 sums are the same for x and
 * x' (K becomes x[n, 0, c] + shift[n, c]), so only K and the apply pass see it.
 *
 * Counters: dda_group_norm_cuda zeroes them (cudaMemsetAsync on the stream: a memset node in
 * a CUDA graph) before each stats launch, and the last block of a launch leaves them as they
 * are. The workspace is scratch of any content: the torch glue takes a caching-allocator block
 * per call, which other ops rewrite between calls (inside a capture, a block of the graph's
 * pool that later nodes of the same graph reuse), so zeros left by one launch would not reach
 * the next. Zeroing per launch keeps every launch, replay and back-to-back call independent,
 * and a launch that failed or never ran leaves nothing for the next one.
 * The combination order is fixed by the plan, not by which block finishes last: results are
 * the same on every run.
 *
 * VEC = 16 / sizeof(T) elements per 16-byte access: needs C % VEC == 0 and 16-byte
 * aligned x, y, gamma, beta and sample strides (the launcher checks).
 * Workspace: uint32 counters [N][bundles] (+ [N] when bundles > 1) padded to 16 bytes; double
 * triples [N][3][G][chunks] (planes S, Q, KS); when bundles > 1, bundle sums
 * [N][3][G][bundles]; float2 statistics [N][G].
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
/* (chunk, group) triples per sample up to which one block combines them all. 1024 triples are
 * 3072 doubles, about 14 loads per thread of a 224-thread block: a few L2 round trips, about what
 * the bundled combination's second ticket (fence, atomic, fence) costs. */
constexpr int64_t kOneLevelTriples = 1024;

/* Layout of the work, the same on host (workspace size, grids) and device. */
struct Plan {
  int vec, cv, rows;        /* elements per vector, vectors per pixel, pixel rows per block */
  int chunks;               /* chunks per sample (at most 512) */
  int bundle, bundles;      /* chunks per bundle, bundles per sample (1: one-level combination) */
  int64_t ppc;              /* pixels per chunk */
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
  pl.chunks = static_cast<int>((p->HW + pl.ppc - 1) / pl.ppc);
  int bundle = pl.chunks;
  if (static_cast<int64_t>(pl.chunks) * p->G > kOneLevelTriples) {
    bundle = 1;
    while (bundle * bundle < pl.chunks) ++bundle;
  }
  pl.bundle = bundle;
  pl.bundles = (pl.chunks + bundle - 1) / bundle;
  return pl;
}

/* Byte offsets of the workspace's parts. */
struct Layout {
  size_t part, bpart, stats, bytes;
  size_t counter_bytes;  /* the prefix of counters that each call zeroes */
};

Layout make_layout(const dda_group_norm_params *p, const Plan &pl) {
  Layout l;
  const size_t N = static_cast<size_t>(p->N), G = static_cast<size_t>(p->G);
  const size_t counters = N * (pl.bundles + (pl.bundles > 1 ? 1 : 0));
  l.counter_bytes = (counters * sizeof(unsigned) + 15) / 16 * 16;
  l.part = l.counter_bytes;
  l.bpart = l.part + N * 3 * G * pl.chunks * sizeof(double);
  l.stats = l.bpart + (pl.bundles > 1 ? N * 3 * G * pl.bundles * sizeof(double) : 0);
  l.bytes = l.stats + N * G * sizeof(float2);
  return l;
}

/* Lanes per group of a warp-segmented sum over `items` values per group: a power of two up to
 * 32, no more than the items need, and few enough that the block's full warps cover all G groups
 * in one pass where they can (the passes are what a combining block waits for in turn). */
__device__ __forceinline__ int seg_width(int64_t items, int G, int warps) {
  int w = 1;
  while (w < 32 && w < items && static_cast<int64_t>(2 * w) * G <= 32LL * warps) w <<= 1;
  return w;
}

/* Every lane of a w-lane segment ends with the segment's sums (a fixed tree order). */
template <int K>
__device__ __forceinline__ void seg_sum(double (&a)[K], int w) {
  for (int o = w >> 1; o > 0; o >>= 1)
#pragma unroll
    for (int j = 0; j < K; ++j) a[j] += __shfl_xor_sync(0xffffffffu, a[j], o);
}

/* f(g, lane in segment) for each group g of this warp, one group per w-lane segment,
 * warps * 32 / w groups per pass. Every lane of a warp makes the same calls (g >= G on spare
 * segments), so f may shuffle within its segment. Only the block's full warps may call it. */
template <typename F>
__device__ __forceinline__ void for_groups(int G, int w, int tid, int warps, F &&f) {
  const int lane = tid & 31, per_warp = 32 / w;
  for (int g0 = (tid >> 5) * per_warp; g0 < G; g0 += warps * per_warp) f(g0 + lane / w, lane & (w - 1));
}

/* The "last block done" ticket: true, in all its threads, for the block that arrives
 * `arrivals`-th at *counter. Global writes the block made before the call are visible to that
 * block (fence before the ticket), which reads them after its own fence, through L2 (__ldcg).
 * No shared memory: the stats kernel's dynamic shared memory may take the whole 48 KB. */
__device__ bool last_to_arrive(unsigned *counter, unsigned arrivals) {
  int last = 0;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    last = atomicAdd(counter, 1u) == arrivals - 1;
    if (last) __threadfence();
  }
  return __syncthreads_or(last) != 0;
}

/* count: [N][bundles] bundle tickets, then [N] sample tickets (zeroed by the launcher).
 * part [N][3][G][chunks], bpart [N][3][G][bundles] double triples; stats [N][G]. */
template <typename T>
__global__ void __launch_bounds__(1024) gn_stats(const dda_group_norm_params p, const Plan pl, unsigned *count,
                                                 double *part, double *bpart, float2 *stats) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ float2 red[];  /* [rows][C] */
  const int cv = threadIdx.x, r = threadIdx.y, R = blockDim.y;
  const int64_t n = blockIdx.y;
  const int chunk = blockIdx.x;
  const T *x = static_cast<const T *>(p.x) + n * p.x_stride_n;
  const int c0 = cv * V;
  const uint4 kv = *reinterpret_cast<const uint4 *>(x + c0);  /* shift: pixel 0 */
  const T *kt = reinterpret_cast<const T *>(&kv);
  float k[V], s[V], q[V];
#pragma unroll
  for (int e = 0; e < V; ++e) { k[e] = to_f32(kt[e]); s[e] = 0.0f; q[e] = 0.0f; }
  const int64_t p0 = chunk * pl.ppc;
  const int64_t p1 = p0 + pl.ppc < p.HW ? p0 + pl.ppc : p.HW;
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
  if (r == 0) {  /* the chunk's (S, Q) per channel into row 0 */
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float2 t = red[c0 + e];
      for (int rr = 1; rr < R; ++rr) {
        const float2 u = red[rr * p.C + c0 + e];
        t.x += u.x;
        t.y += u.y;
      }
      red[c0 + e] = t;
    }
  }
  __syncthreads();

  const int G = p.G, cpg = static_cast<int>(p.C / G);
  const int tid = r * blockDim.x + cv, warps = static_cast<int>(blockDim.x * blockDim.y) / 32;
  const bool full_warp = tid < warps * 32;
  const T *sh = p.shift ? static_cast<const T *>(p.shift) + n * p.shift_stride_n : nullptr;
  const auto K = [&](int c) { return static_cast<double>(to_f32(x[c])) + (sh ? to_f32(sh[c]) : 0.0f); };
  const int64_t plane = static_cast<int64_t>(G) * pl.chunks;  /* doubles per plane of part */
  const int64_t bplane = static_cast<int64_t>(G) * pl.bundles;
  double *tri = part + n * 3 * plane;  /* this sample's [3][G][chunks] */

  if (full_warp) {  /* this chunk's triple per group */
    const int w = seg_width(cpg, G, warps);
    for_groups(G, w, tid, warps, [&](int g, int l) {
      double a[3] = {0.0, 0.0, 0.0};
      if (g < G)
        for (int c = g * cpg + l; c < (g + 1) * cpg; c += w) {
          const float2 v = red[c];
          a[0] += v.x;
          a[1] += v.y;
          a[2] += K(c) * v.x;
        }
      seg_sum(a, w);
      if (g < G && l == 0)
#pragma unroll
        for (int j = 0; j < 3; ++j) tri[j * plane + static_cast<int64_t>(g) * pl.chunks + chunk] = a[j];
    });
  }

  /* The sample's statistics from its triples src [3][G][len] (row stride len). */
  const auto finish = [&](const double *src, int len) {
    if (!full_warp) return;
    const int w = seg_width(len > cpg ? len : cpg, G, warps);
    const int64_t fplane = static_cast<int64_t>(G) * len;
    for_groups(G, w, tid, warps, [&](int g, int l) {
      /* sum S, sum Q, sum K S over (item, channel); sum K, sum K^2 over the group's channels */
      double a[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
      if (g < G) {
        const double *row = src + static_cast<int64_t>(g) * len;
#pragma unroll 4
        for (int i = l; i < len; i += w) {
          a[0] += __ldcg(row + i);
          a[1] += __ldcg(row + fplane + i);
          a[2] += __ldcg(row + 2 * fplane + i);
        }
        for (int c = g * cpg + l; c < (g + 1) * cpg; c += w) {
          const double kc = K(c);
          a[3] += kc;
          a[4] += kc * kc;
        }
      }
      seg_sum(a, w);
      if (g < G && l == 0) {
        const double hw = static_cast<double>(p.HW), cnt = hw * cpg;
        const double mean = (a[0] + hw * a[3]) / cnt;
        /* sum over channels of Q + 2 (K - mean) S + HW (K - mean)^2 */
        double m2 = a[1] + 2.0 * (a[2] - mean * a[0]) + hw * (a[4] - 2.0 * mean * a[3] + cpg * mean * mean);
        if (m2 < 0.0) m2 = 0.0;
        stats[n * G + g] = make_float2(static_cast<float>(mean), static_cast<float>(rsqrt(m2 / cnt + p.eps)));
      }
    });
  };

  const int b = chunk / pl.bundle;
  const int in_bundle = pl.chunks - b * pl.bundle < pl.bundle ? pl.chunks - b * pl.bundle : pl.bundle;
  if (!last_to_arrive(count + n * pl.bundles + b, in_bundle)) return;
  if (pl.bundles == 1) {
    finish(tri, pl.chunks);
    return;
  }
  double *btri = bpart + n * 3 * bplane;  /* this sample's [3][G][bundles] */
  if (full_warp) {  /* this bundle's sums per group */
    const int w = seg_width(in_bundle, G, warps);
    for_groups(G, w, tid, warps, [&](int g, int l) {
      double a[3] = {0.0, 0.0, 0.0};
      if (g < G) {
        const double *row = tri + static_cast<int64_t>(g) * pl.chunks + b * pl.bundle;
#pragma unroll 4
        for (int i = l; i < in_bundle; i += w)
#pragma unroll
          for (int j = 0; j < 3; ++j) a[j] += __ldcg(row + j * plane + i);
      }
      seg_sum(a, w);
      if (g < G && l == 0)
#pragma unroll
        for (int j = 0; j < 3; ++j) btri[j * bplane + static_cast<int64_t>(g) * pl.bundles + b] = a[j];
    });
  }
  if (!last_to_arrive(count + p.N * pl.bundles + n, pl.bundles)) return;
  finish(btri, pl.bundles);
}

/* stats [N][G]. A thread steps through the sample's (pixel, vector) items by the grid stride,
 * carrying (pixel, vector) forward by the stride's quotient and remainder, and walks its
 * vector's VEC channels through the groups from one division: one 32-bit division per vector
 * instead of one per element plus a 64-bit one for the pixel. */
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
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  const int dpx = stride / cv, dvec = stride % cv;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t px = first / cv;
  int vec = static_cast<int>(first % cv);
  while (px < p.HW) {
    const int c0 = vec * V;
    const int64_t off = px * p.C + c0;
    const uint4 xv = *reinterpret_cast<const uint4 *>(x + off);
    const T *xt = reinterpret_cast<const T *>(&xv);
    uint4 gv = make_uint4(0, 0, 0, 0), bv = make_uint4(0, 0, 0, 0);
    if (gamma) gv = *reinterpret_cast<const uint4 *>(gamma + c0);
    if (beta) bv = *reinterpret_cast<const uint4 *>(beta + c0);
    const T *gt = reinterpret_cast<const T *>(&gv), *bt = reinterpret_cast<const T *>(&bv);
    uint4 ov;
    T *o = reinterpret_cast<T *>(&ov);
    int g = c0 / cpg, in_group = c0 - g * cpg;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float2 s = st[g];
      const float xe = shift ? to_f32(xt[e]) + to_f32(shift[c0 + e]) : to_f32(xt[e]);
      float v = (xe - s.x) * s.y;
      if (gamma) v *= to_f32(gt[e]);
      if (beta) v += to_f32(bt[e]);
      if (p.silu) v = v / (1.0f + __expf(-v));
      o[e] = from_f32<T>(v);
      if (++in_group == cpg) {
        in_group = 0;
        ++g;
      }
    }
    *reinterpret_cast<uint4 *>(y + off) = ov;
    px += dpx;
    vec += dvec;
    if (vec >= cv) {
      vec -= cv;
      ++px;
    }
  }
}

int esize_of(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }

bool aligned16(const void *ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
dda_status launch(const dda_group_norm_params *p, const Plan &pl, const Layout &l, char *ws, cudaStream_t stream) {
  unsigned *count = reinterpret_cast<unsigned *>(ws);
  double *part = reinterpret_cast<double *>(ws + l.part), *bpart = reinterpret_cast<double *>(ws + l.bpart);
  float2 *stats = reinterpret_cast<float2 *>(ws + l.stats);
  cudaError_t e = cudaMemsetAsync(count, 0, l.counter_bytes, stream);
  if (e != cudaSuccess) return cuda_fail(e);
  const dim3 sblock(pl.cv, pl.rows);
  const size_t sred = static_cast<size_t>(pl.rows) * p->C * sizeof(float2);
  gn_stats<T><<<dim3(static_cast<unsigned>(pl.chunks), static_cast<unsigned>(p->N)), sblock, sred, stream>>>(
      *p, pl, count, part, bpart, stats);
  /* One thread per 16-byte vector up to 2048 blocks in all (about two waves on an H200), a
   * grid-stride loop beyond. */
  const int64_t work = p->HW * pl.cv;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = (2048 + p->N - 1) / p->N;
  if (blocks > cap) blocks = cap;
  gn_apply<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p->N)), kThreads,
                 static_cast<size_t>(p->G) * sizeof(float2), stream>>>(*p, stats);
  e = cudaGetLastError();
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
  return make_layout(p, make_plan(p, esize_of(p->dtype))).bytes;
}

extern "C" dda_status dda_group_norm_cuda(const dda_group_norm_params *p, void *workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  const dda_status st = dda_group_norm_check(p);
  if (st != DDA_OK) return st;
  if (dda_group_norm_supported_cuda(p)) return DDA_ERR_INVALID_ARGUMENT;
  const size_t need = dda_group_norm_workspace_bytes(p);
  if (workspace == nullptr || workspace_bytes < need || !aligned16(workspace)) return DDA_ERR_INVALID_ARGUMENT;
  const Plan pl = make_plan(p, esize_of(p->dtype));
  const Layout l = make_layout(p, pl);
  char *ws = static_cast<char *>(workspace);
  switch (p->dtype) {
    case DDA_F16: return launch<__half>(p, pl, l, ws, stream);
    case DDA_BF16: return launch<__nv_bfloat16>(p, pl, l, ws, stream);
    default: return launch<float>(p, pl, l, ws, stream);
  }
}
