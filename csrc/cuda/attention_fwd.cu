/*
 * attention_fwd.cu: flash-attention forward, generic SIMT kernel + launcher.
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise (usually views of packed [B, S, 3, H, D]
 *                       or [B, Sk, 2, H, D], so stride_s = 3*H*D or 2*H*D)
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 *
 * One block = BM query rows of one (b, h); 4 warps, each owning R rows.
 * The block walks the keys in tiles of KB (DDA_ATTN_KEY_BLOCK = 64, smaller
 * only where shared memory would not fit). K and V tiles live in shared
 * memory in the input dtype, loaded with cp.async into one K and one V
 * buffer: V(t) streams in while S = Q K(t)^T is computed, and K(t+1) while
 * P V(t) is. Everything else is fp32:
 *   - Q rows are staged once in shared memory as fp32, prescaled by
 *     scale * log2(e), so softmax runs in base 2 (exp2f);
 *   - scores: each lane owns keys lane and lane + 32 of the tile and reads
 *     Q by broadcast, K rows 16 bytes at a time (rows padded by 16 bytes so
 *     the 8 lanes of a shared-memory phase hit distinct banks);
 *   - online softmax: row max over the warp by shuffles, running max m and
 *     per-lane partial sums l (the rescale factor is the same for every
 *     lane, so l is reduced across the warp only once at the end);
 *   - P (fp32) goes through a per-warp shared buffer [KB][R] and is read back
 *     by broadcast; for P V each lane owns column pairs 2*lane + 64*i, i < NP.
 * NP = ceil(D / 64) is the template bucket that bounds the registers of the
 * accumulator (R x 2*NP floats per lane). D = 512 (NP = 8) uses fewer rows per
 * warp so the accumulator stays at 64 registers.
 * Keys past Sk and columns past D are zero-filled in shared memory, so no
 * inner loop needs a bound check; keys past Sk get score -inf.
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdio.h>

#include <atomic>

#include "attention_common.cuh"
#include "dda.h"
#include "dtype_convert.cuh"
#include "launch_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
/* Opt-in shared memory per block of the smallest (sm_86/89/120) and largest
 * (sm_90/100) current parts: which key tiles get compiled depends on them. */
constexpr size_t kSmemSmall = 101376;
constexpr size_t kSmemLarge = 232448;


/* 8 consecutive elements from 16-byte aligned shared memory, as fp32. */
__device__ __forceinline__ void load8(const float *p, float f[8]) {
  const float4 a = reinterpret_cast<const float4 *>(p)[0];
  const float4 b = reinterpret_cast<const float4 *>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __half *p, float f[8]) {
  const uint4 u = *reinterpret_cast<const uint4 *>(p);
  const __half2 *h = reinterpret_cast<const __half2 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float f[8]) {
  const uint4 u = *reinterpret_cast<const uint4 *>(p);
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x; f[2 * i + 1] = t.y;
  }
}

/* 2 consecutive elements from shared memory aligned to their pair, as fp32. */
__device__ __forceinline__ float2 load2(const float *p) { return *reinterpret_cast<const float2 *>(p); }
__device__ __forceinline__ float2 load2(const __half *p) {
  return __half22float2(*reinterpret_cast<const __half2 *>(p));
}
__device__ __forceinline__ float2 load2(const __nv_bfloat16 *p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/* Mask value of one (row, key) in log2 units: 0 or -inf for bool masks. */
__device__ __forceinline__ float mask_log2(const void *mask, int kind, int64_t off) {
  switch (kind) {
    case DDA_MASK_BOOL:
      return static_cast<const unsigned char *>(mask)[off] ? 0.0f : -INFINITY;
    case DDA_MASK_ADD_F32:
      return static_cast<const float *>(mask)[off] * kLog2e;
    case DDA_MASK_ADD_F16:
      return __half2float(static_cast<const __half *>(mask)[off]) * kLog2e;
    case DDA_MASK_ADD_BF16:
      return __bfloat162float(static_cast<const __nv_bfloat16 *>(mask)[off]) * kLog2e;
    default:
      return 0.0f;
  }
}

/* --------------------------------------------------------- tile config -- */

/* Query rows per warp for an element size and bucket NP = ceil(D / 64). */
__host__ __device__ constexpr int rows_per_warp(int elem_bytes, int np) {
  return np <= 4 ? 8 : (elem_bytes == 4 ? 2 : 4);
}

/* Query rows of one block. */
__host__ __device__ constexpr int block_rows(int elem_bytes, int np) {
  return kWarps * rows_per_warp(elem_bytes, np);
}

/* Dynamic shared memory of one block:
 *   q_s [BM][64*NP] fp32 | p_s [warps][KB][R] fp32 | k_s [KB][64*NP + pad] T | v_s [KB][64*NP] T */
__host__ __device__ constexpr size_t smem_bytes(int elem_bytes, int np, int kb) {
  return static_cast<size_t>(kWarps) * rows_per_warp(elem_bytes, np) * 64 * np * 4 +
         static_cast<size_t>(kWarps) * kb * rows_per_warp(elem_bytes, np) * 4 +
         static_cast<size_t>(kb) * (64 * np * elem_bytes + 16) +
         static_cast<size_t>(kb) * 64 * np * elem_bytes;
}

/* Key tiles compiled for (element size, NP): DDA_ATTN_KEY_BLOCK always (where
 * it fits the largest parts), and a halved tile only where the larger one
 * does not fit the smallest parts. */
__host__ __device__ constexpr bool has_tile(int elem_bytes, int np, int kb) {
  return smem_bytes(elem_bytes, np, kb) <= kSmemLarge &&
         (kb == DDA_ATTN_KEY_BLOCK || smem_bytes(elem_bytes, np, 2 * kb) > kSmemSmall);
}

/* The key tile to run: the largest compiled one of which two blocks fit in
 * one SM's shared memory (so barriers of one block overlap the other's work),
 * else the largest that fits one block; 0 if none fits. */
int pick_tile(int elem_bytes, int np, size_t block_limit, size_t sm_limit) {
  for (int kb = DDA_ATTN_KEY_BLOCK; kb >= 16; kb /= 2)
    if (has_tile(elem_bytes, np, kb) && smem_bytes(elem_bytes, np, kb) <= block_limit &&
        2 * (smem_bytes(elem_bytes, np, kb) + 1024) <= sm_limit)
      return kb;
  for (int kb = DDA_ATTN_KEY_BLOCK; kb >= 16; kb /= 2)
    if (has_tile(elem_bytes, np, kb) && smem_bytes(elem_bytes, np, kb) <= block_limit) return kb;
  return 0;
}

/* ------------------------------------------------------------- kernel -- */

/* Stages keys [k0, k0 + KB) x columns [0, 64*NP) of one (b, h) into dst
 * (row stride LD elements), zero-filling past Sk and past D. `vec`: the
 * source rows are 16-byte aligned, so cp.async is used; otherwise element
 * loads (synchronous, made visible by the caller's __syncthreads). */
template <typename T, int NP, int KB, int LD>
__device__ __forceinline__ void load_tile(T *dst, const T *src, int64_t stride_s, int k0, int Sk,
                                          int D, bool vec) {
  constexpr int kCols = 64 * NP;
  if (vec) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
    constexpr int kChunksPerRow = kCols / kPer;
    for (int c = threadIdx.x; c < KB * kChunksPerRow; c += kThreads) {
      const int j = c / kChunksPerRow;
      const int d = (c - j * kChunksPerRow) * kPer;
      const bool ok = k0 + j < Sk && d < D;
      const T *g = ok ? src + static_cast<int64_t>(k0 + j) * stride_s + d : src;
      cp_async16(dst + j * LD + d, g, ok ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < KB * kCols; e += kThreads) {
      const int j = e / kCols;
      const int d = e - j * kCols;
      dst[j * LD + d] = (k0 + j < Sk && d < D) ? src[static_cast<int64_t>(k0 + j) * stride_s + d]
                                               : from_f32<T>(0.0f);
    }
  }
}

/* s[r][c] += q_r . k_{lane + 32c} over d < D for the first NC key groups.
 * qw: the warp's Q rows [R][64*NP] fp32; k_s: the key tile [KB][LDK]. */
template <typename T, int NP, int KB, int R, int KPL, int NC>
__device__ __forceinline__ void score_tile(float (&s)[R][KPL], const float *qw, const T *k_s,
                                           int D, int lane) {
  constexpr int kQld = 64 * NP;
  constexpr int kLdk = 64 * NP + 16 / static_cast<int>(sizeof(T));
  const T *krow[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) krow[c] = k_s + min(lane + 32 * c, KB - 1) * kLdk;
#pragma unroll 2
  for (int d = 0; d < D; d += 8) {
    float kf[NC][8];
#pragma unroll
    for (int c = 0; c < NC; ++c) load8(krow[c] + d, kf[c]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 qa = *reinterpret_cast<const float4 *>(qw + r * kQld + d);
      const float4 qb = *reinterpret_cast<const float4 *>(qw + r * kQld + d + 4);
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        float x = s[r][c];
        x = fmaf(qa.x, kf[c][0], x); x = fmaf(qa.y, kf[c][1], x);
        x = fmaf(qa.z, kf[c][2], x); x = fmaf(qa.w, kf[c][3], x);
        x = fmaf(qb.x, kf[c][4], x); x = fmaf(qb.y, kf[c][5], x);
        x = fmaf(qb.z, kf[c][6], x); x = fmaf(qb.w, kf[c][7], x);
        s[r][c] = x;
      }
    }
  }
}

template <typename T, int NP, int KB>
__global__ void __launch_bounds__(kThreads)
attention_fwd_simt(const dda_attention_params p, const bool vec) {
  constexpr int R = rows_per_warp(static_cast<int>(sizeof(T)), NP);
  constexpr int BM = block_rows(static_cast<int>(sizeof(T)), NP);
  constexpr int DP = 64 * NP;                                   /* padded head dim */
  constexpr int LDK = DP + 16 / static_cast<int>(sizeof(T));    /* K row stride */
  constexpr int KPL = (KB + 31) / 32;                           /* keys per lane */

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float *q_s = reinterpret_cast<float *>(smem_raw);             /* [BM][DP] */
  float *p_s = q_s + BM * DP;                                   /* [kWarps][KB][R] */
  T *k_s = reinterpret_cast<T *>(p_s + kWarps * KB * R);        /* [KB][LDK] */
  T *v_s = k_s + KB * LDK;                                      /* [KB][DP] */

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const BlockCoords bc = block_coords(p);
  const int h = bc.h;
  const int b = bc.b;
  const int row0 = bc.tile * BM + warp * R;                     /* this warp's first query row */
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;

  const T *q = static_cast<const T *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T *k = static_cast<const T *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const T *v = static_cast<const T *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const int mkind = p.mask ? static_cast<int>(p.mask_kind) : DDA_MASK_NONE;
  const int64_t mbase = b * p.mask_stride_b + h * p.mask_stride_h;

  /* cp.async groups are committed in the order K0, V0, K1, V1, ...; each wait
   * leaves only the most recent group in flight. */
  load_tile<T, NP, KB, LDK>(k_s, k, p.k_stride_s, 0, Sk, D, vec);
  cp_async_commit();
  load_tile<T, NP, KB, DP>(v_s, v, p.v_stride_s, 0, Sk, D, vec);
  cp_async_commit();

  float *qw = q_s + warp * R * DP;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row0 + r;
    for (int d = lane; d < DP; d += 32)
      qw[r * DP + d] =
          (i < Sq && d < D) ? to_f32(q[static_cast<int64_t>(i) * p.q_stride_s + d]) * p.scale_log2 : 0.0f;
  }

  float m[R], l[R], acc[R][2 * NP];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < 2 * NP; ++e) acc[r][e] = 0.0f;
  }

  float *pw = p_s + warp * KB * R;
  const int ntiles = (Sk + KB - 1) / KB;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * KB;
    cp_async_wait_one();                                        /* K(t) landed */
    __syncthreads();

    float s[R][KPL];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < KPL; ++c) s[r][c] = 0.0f;
    if (KPL == 2 && k0 + 32 >= Sk)
      score_tile<T, NP, KB, R, KPL, 1>(s, qw, k_s, D, lane);    /* tail tile: skip keys 32.. */
    else
      score_tile<T, NP, KB, R, KPL, KPL>(s, qw, k_s, D, lane);

    __syncthreads();                                            /* every warp is done with K(t) */
    if (t + 1 < ntiles) load_tile<T, NP, KB, LDK>(k_s, k, p.k_stride_s, k0 + KB, Sk, D, vec);
    cp_async_commit();

    /* Mask, then the online-softmax update; s becomes P (unnormalised). */
    bool valid[KPL];
#pragma unroll
    for (int c = 0; c < KPL; ++c) valid[c] = lane + 32 * c < KB && k0 + lane + 32 * c < Sk;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t mrow = mbase + static_cast<int64_t>(min(row0 + r, Sq - 1)) * p.mask_stride_q;
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < KPL; ++c) {
        float x = -INFINITY;
        if (valid[c]) {
          x = s[r][c];
          if (mkind != DDA_MASK_NONE)
            x += mask_log2(p.mask, mkind, mrow + static_cast<int64_t>(k0 + lane + 32 * c) * p.mask_stride_k);
        }
        s[r][c] = x;
        mx = fmaxf(mx, x);
      }
      mx = warp_max(mx);
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;    /* all masked so far: keep 0s */
      const float alpha = exp2f(m[r] - m_use);
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < KPL; ++c) {
        s[r][c] = exp2f(s[r][c] - m_use);
        sum += s[r][c];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
#pragma unroll
      for (int e = 0; e < 2 * NP; ++e) acc[r][e] *= alpha;
    }
#pragma unroll
    for (int c = 0; c < KPL; ++c) {
      if (lane + 32 * c < KB) {
        float *dst = pw + (lane + 32 * c) * R;
#pragma unroll
        for (int r = 0; r < R; r += 2) *reinterpret_cast<float2 *>(dst + r) = make_float2(s[r][c], s[r + 1][c]);
      }
    }

    cp_async_wait_one();                                        /* V(t) landed */
    __syncthreads();                                            /* and P is visible to the warp */

    const int kv = min(KB, Sk - k0);
    const T *vcol = v_s + 2 * lane;
    /* Unrolled only while the accumulator is small, so registers stay bounded. */
#pragma unroll(NP <= 2 ? 2 : 1)
    for (int j = 0; j < kv; ++j) {
      float pr[R];
      if constexpr (R % 4 == 0) {
#pragma unroll
        for (int r = 0; r < R; r += 4) {
          const float4 t4 = *reinterpret_cast<const float4 *>(pw + j * R + r);
          pr[r] = t4.x; pr[r + 1] = t4.y; pr[r + 2] = t4.z; pr[r + 3] = t4.w;
        }
      } else {
#pragma unroll
        for (int r = 0; r < R; r += 2) {
          const float2 t2 = *reinterpret_cast<const float2 *>(pw + j * R + r);
          pr[r] = t2.x; pr[r + 1] = t2.y;
        }
      }
#pragma unroll
      for (int n = 0; n < NP; ++n) {
        const float2 vv = load2(vcol + j * DP + 64 * n);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc[r][2 * n] = fmaf(pr[r], vv.x, acc[r][2 * n]);
          acc[r][2 * n + 1] = fmaf(pr[r], vv.y, acc[r][2 * n + 1]);
        }
      }
    }

    __syncthreads();                                            /* every warp is done with V(t) and P */
    if (t + 1 < ntiles) load_tile<T, NP, KB, DP>(v_s, v, p.v_stride_s, k0 + KB, Sk, D, vec);
    cp_async_commit();
  }

  T *o = static_cast<T *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row0 + r;
    const float lsum = warp_sum(l[r]);
    if (i >= Sq) continue;
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;         /* all keys masked: o = 0 */
    T *orow = o + static_cast<int64_t>(i) * p.o_stride_s;
#pragma unroll
    for (int n = 0; n < NP; ++n) {
      const int col = 64 * n + 2 * lane;
      if (col < D) {
        orow[col] = from_f32<T>(acc[r][2 * n] * inv);
        orow[col + 1] = from_f32<T>(acc[r][2 * n + 1] * inv);
      }
    }
    if (p.lse && lane == 0)
      p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + i] =
          lsum > 0.0f ? (m[r] + log2f(lsum)) * kLn2 : lsum == 0.0f ? -INFINITY : lsum;  /* NaN stays NaN */
  }
}

/* ----------------------------------------------------------- launcher -- */

template <typename T, int NP, int KB>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  constexpr int BM = block_rows(static_cast<int>(sizeof(T)), NP);
  constexpr size_t smem = smem_bytes(static_cast<int>(sizeof(T)), NP, KB);
  auto kernel = attention_fwd_simt<T, NP, KB>;
  if (smem > 48 * 1024) {
    static std::atomic<unsigned long long> raised{0};
    const cudaError_t e = raise_smem_once(kernel, smem, raised);
    if (e != cudaSuccess) return cuda_fail(e);
  }
  const bool vec = aligned16(p->k, p->k_stride_b, p->k_stride_s, p->k_stride_h, sizeof(T)) &&
                   aligned16(p->v, p->v_stride_b, p->v_stride_s, p->v_stride_h, sizeof(T));
  dim3 grid;
  if (!fold_grid((p->Sq + BM - 1) / BM, p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, kThreads, smem, stream>>>(*p, vec);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T, int NP>
dda_status launch_np(const dda_attention_params *p, size_t block_limit, size_t sm_limit,
                     cudaStream_t stream) {
  constexpr int eb = static_cast<int>(sizeof(T));
  switch (pick_tile(eb, NP, block_limit, sm_limit)) {
    case 64:
      if constexpr (has_tile(eb, NP, 64)) return launch<T, NP, 64>(p, stream);
      break;
    case 32:
      if constexpr (has_tile(eb, NP, 32)) return launch<T, NP, 32>(p, stream);
      break;
    case 16:
      if constexpr (has_tile(eb, NP, 16)) return launch<T, NP, 16>(p, stream);
      break;
    default:
      break;
  }
  return DDA_ERR_UNSUPPORTED_HEAD_DIM;
}

/* Head-dim bucket: D in (64*(NP-1), 64*NP], with 5..8 sharing NP = 8. */
int np_bucket(int D) {
  const int np = (D + 63) / 64;
  return np <= 4 ? np : 8;
}

template <typename T>
dda_status launch_dtype(const dda_attention_params *p, size_t block_limit, size_t sm_limit,
                        cudaStream_t stream) {
  switch (np_bucket(p->D)) {
    case 1: return launch_np<T, 1>(p, block_limit, sm_limit, stream);
    case 2: return launch_np<T, 2>(p, block_limit, sm_limit, stream);
    case 3: return launch_np<T, 3>(p, block_limit, sm_limit, stream);
    case 4: return launch_np<T, 4>(p, block_limit, sm_limit, stream);
    default: return launch_np<T, 8>(p, block_limit, sm_limit, stream);
  }
}

int elem_bytes(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }

/* The generic kernel's name for the tile pick_tile chooses (it takes every case its
 * shared memory fits). */
const char *generic_name(dda_dtype dtype, int head_dim, int kb) {
  /* names[dtype][bucket][tile]: built once, thread-safe (function-local static). */
  struct Names {
    char s[3][5][3][48];
    Names() {
      static const char *dt[3] = {"f32", "f16", "bf16"};
      static const int dp[5] = {64, 128, 192, 256, 512};
      for (int a = 0; a < 3; ++a)
        for (int n = 0; n < 5; ++n)
          for (int t = 0; t < 3; ++t)
            snprintf(s[a][n][t], sizeof s[a][n][t], "generic_simt_d%d_kb%d_%s", dp[n], 64 >> t, dt[a]);
    }
  };
  static const Names names;
  const int np = np_bucket(head_dim);
  const int bucket = np <= 4 ? np - 1 : 4;
  const int tile = kb == 64 ? 0 : kb == 32 ? 1 : 2;
  return names.s[static_cast<int>(dtype)][bucket][tile];
}

/* ------------------------------------------------------------- family -- */

const char *generic_unsupported(const dda_attention_params *, const dda_attn::DevInfo &) { return nullptr; }

/* The tile it runs, else (nothing fits) the smallest tile's need, which the dispatcher refuses. */
size_t generic_smem(const dda_attention_params *p, const dda_attn::DevInfo &d) {
  const int eb = elem_bytes(p->dtype), np = np_bucket(p->D);
  const int kb = pick_tile(eb, np, d.block_smem, d.sm_smem);
  if (kb != 0) return smem_bytes(eb, np, kb);
  size_t least = ~static_cast<size_t>(0);
  for (int t = DDA_ATTN_KEY_BLOCK; t >= 16; t /= 2)
    if (has_tile(eb, np, t) && smem_bytes(eb, np, t) < least) least = smem_bytes(eb, np, t);
  return least;
}

long long generic_head_blocks(const dda_attention_params *p, const dda_attn::DevInfo &) {
  const int bm = block_rows(elem_bytes(p->dtype), np_bucket(p->D));
  return (p->Sq + bm - 1) / bm;
}

bool generic_preferred(const dda_attention_params *, const dda_attn::DevInfo &) { return true; }

const char *generic_kernel(const dda_attention_params *p, const dda_attn::DevInfo &d) {
  return generic_name(p->dtype, p->D, pick_tile(elem_bytes(p->dtype), np_bucket(p->D), d.block_smem, d.sm_smem));
}

dda_status generic_launch(const dda_attention_params *p, const dda_attn::DevInfo &d, cudaStream_t stream) {
  switch (p->dtype) {
    case DDA_F32: return launch_dtype<float>(p, d.block_smem, d.sm_smem, stream);
    case DDA_F16: return launch_dtype<__half>(p, d.block_smem, d.sm_smem, stream);
    default: return launch_dtype<__nv_bfloat16>(p, d.block_smem, d.sm_smem, stream);
  }
}

}  // namespace

/* Any dtype, any alignment, D <= 512 (the fallback of the automatic dispatch). */
const dda_attn::Family dda_attn::kGenericFamily = {DDA_ATTN_GENERIC, generic_unsupported, generic_smem,
                                                   generic_head_blocks, generic_preferred, generic_kernel,
                                                   generic_launch};
