/* mma_common.cuh: the PTX wrappers and softmax helpers shared by the tensor-core
 * attention kernels (attention_fwd_mma.cu for D <= 256, attention_fwd_d512.cu above,
 * and the two Hopper kernels).
 * Fragment layouts of mma.sync m16n8k16 are described in attention_fwd_mma.cu. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "attention_common.cuh"
#include "dda.h"

namespace {

/* ------------------------------------------------------- PTX wrappers -- */

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/* c[16x8] += a[16x16] b[16x8], fp32 accumulate; T picks f16 or bf16 inputs. */
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/* Two floats -> one b32 of T pairs, x in the low half (the lower column index). */
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  uint32_t u;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(x, y);
    u = *reinterpret_cast<const uint32_t *>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    u = *reinterpret_cast<const uint32_t *>(&h);
  }
  return u;
}

/* 2^x; 2^-inf = 0. */
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/* One mask element in log2 units: 0 or -inf for bool masks. */
__device__ __forceinline__ float mask_value(const unsigned char *m) { return *m ? 0.0f : -INFINITY; }
__device__ __forceinline__ float mask_value(const float *m) { return *m * kLog2e; }
__device__ __forceinline__ float mask_value(const __half *m) { return __half2float(*m) * kLog2e; }
__device__ __forceinline__ float mask_value(const __nv_bfloat16 *m) { return __bfloat162float(*m) * kLog2e; }

/* s (already in log2 units) += mask for keys < Sk; keys >= Sk -> -inf. Element
 * e of s[j] is row g + 8 * (e / 2), key k0 + 8j + 2c + e % 2; mrow[r] is the
 * mask offset of row g + 8r (NULL mask: M = unsigned char and no reads). */
template <typename M, int NS>
__device__ __forceinline__ void mask_tile(float (&s)[NS][4], const M *mask, const int64_t (&mrow)[2],
                                          int64_t stride_k, int k0, int c, int Sk) {
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = k0 + 8 * j + 2 * c + (e & 1);
      if (key >= Sk)
        s[j][e] = -INFINITY;
      else if (mask)
        s[j][e] += mask_value(mask + mrow[e >> 1] + static_cast<int64_t>(key) * stride_k);
    }
}

/* ------------------------------------------------------- tile loads -- */

/* Stages rows [r0, r0 + ROWS) x columns [0, DP) of src (row stride `stride` elements,
 * 16-byte aligned rows) into dst (row stride DP + 8 elements) with cp.async from THREADS
 * threads, this one being `tid`; rows >= nrows and columns >= D are zero-filled. */
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_rows(uint32_t dst, const uint16_t *src, int64_t stride, int r0, int nrows,
                                          int D, int tid) {
  constexpr int kChunks = DP / 8;  /* 16-byte chunks per row */
  constexpr int kTotal = ROWS * kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += THREADS) {
    const int c = c0 + tid;
    if (kTotal % THREADS == 0 || c < kTotal) {
      const int r = c / kChunks;
      const int d = (c - r * kChunks) * 8;
      const bool ok = r0 + r < nrows && d < D;
      const uint16_t *g = ok ? src + static_cast<int64_t>(r0 + r) * stride + d : src;
      cp_async16(dst + static_cast<uint32_t>((r * (DP + 8) + d) * 2), g, ok ? 16 : 0);
    }
  }
}

/* ------------------------------------------------------ online softmax -- */

/* Online softmax of one key tile of S in place, for 16 rows of this warp (the m16n8 C
 * layout of mma.sync, which is also wgmma's m64nN accumulator layout per warp):
 *   s <- 2^(s * sc - m_new) (fp32), m (running row max, log2 units) and l (this lane's
 *   part of the running row sums) updated, alpha = 2^(m_old - m_new) for rows g, g + 8.
 * Scores in log2 units are s * sc with sc = scale * log2(e); full unmasked tiles fold sc
 * into the exponent's FMA. Keys >= Sk get -inf; MASK (compiled in) adds p.mask of kind
 * mkind through the row offsets mrow (rows g, g + 8); with RUNTIME, mkind may also be
 * DDA_MASK_NONE (kernels that take masked and unmasked calls in one instantiation).
 * k0 is the tile's first key. */
template <int NS, bool MASK, bool RUNTIME = false>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               const dda_attention_params &p, int mkind, const int64_t (&mrow)[2],
                                               float scale_log2, int k0, int c) {
  float sc = scale_log2;
  const bool masked = MASK && (!RUNTIME || mkind != DDA_MASK_NONE);
  if (k0 + NS * 8 > p.Sk || masked || !(scale_log2 > 0.0f)) {
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
    sc = 1.0f;
    switch (MASK ? mkind : DDA_MASK_NONE) {
      case DDA_MASK_BOOL:
        mask_tile(s, static_cast<const unsigned char *>(p.mask), mrow, p.mask_stride_k, k0, c, p.Sk);
        break;
      case DDA_MASK_ADD_F32:
        mask_tile(s, static_cast<const float *>(p.mask), mrow, p.mask_stride_k, k0, c, p.Sk);
        break;
      case DDA_MASK_ADD_F16:
        mask_tile(s, static_cast<const __half *>(p.mask), mrow, p.mask_stride_k, k0, c, p.Sk);
        break;
      case DDA_MASK_ADD_BF16:
        mask_tile(s, static_cast<const __nv_bfloat16 *>(p.mask), mrow, p.mask_stride_k, k0, c, p.Sk);
        break;
      default:
        mask_tile(s, static_cast<const unsigned char *>(nullptr), mrow, 0, k0, c, p.Sk);
        break;
    }
  }
  /* The 4 lanes of a quad (same g) hold one row between them. */
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
  }
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m[r], mx[r] * sc);
    m_use[r] = m_new == -INFINITY ? 0.0f : m_new;  /* all masked so far: p and alpha stay 0 */
    alpha[r] = fast_exp2(m[r] - m_use[r]);
    m[r] = m_new;
  }
  float rs[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = fast_exp2(fmaf(s[j][e], sc, -m_use[e >> 1]));
      rs[e >> 1] += s[j][e];
    }
  l[0] = l[0] * alpha[0] + rs[0];
  l[1] = l[1] * alpha[1] + rs[1];
}

/* P (the exponentials in s) of k-step kk = keys 16 kk .. 16 kk + 15 = S tiles 2 kk, 2 kk + 1
 * as A fragments (the A layout of mma.sync m16n8k16, also wgmma's A from registers). */
template <typename T, int NS>
__device__ __forceinline__ void pack_p_step(uint32_t (&pa)[4], const float (&s)[NS][4], int kk) {
  pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

/* Every k-step of P at once (the wgmma kernels issue them back to back). */
template <typename T, int NS>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[NS / 2][4], const float (&s)[NS][4]) {
#pragma unroll
  for (int kk = 0; kk < NS / 2; ++kk) pack_p_step<T, NS>(pa[kk], s, kk);
}

/* S[16][8 NS] = Q K^T for one warp's 16 rows (mma.sync), KS k-steps of 16 columns: Q
 * A-fragments and K B-fragments by ldmatrix from row-major tiles in shared memory; q and k
 * are the tiles + this lane's offsets (Q: (lane % 16) rows, 8 (lane / 16) columns; K: key
 * lane % 8 + 8 (lane / 16), column 8 ((lane / 8) % 2)), ld_bytes the K tile's row stride. */
template <typename T, int NS, int KS>
__device__ __forceinline__ void qk_mma(float (&s)[NS][4], uint32_t q, uint32_t k, uint32_t ld_bytes) {
#pragma unroll
  for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
    ldsm_x4(a, q + ks * 32);
#pragma unroll
    for (int j = 0; j < NS; j += 2) {
      uint32_t bk[4];
      ldsm_x4(bk, k + j * 8 * ld_bytes + ks * 32);
      mma16816<T>(s[j], a, bk[0], bk[1]);
      mma16816<T>(s[j + 1], a, bk[2], bk[3]);
    }
  }
}

/* O[16][8 NO] += P V for one warp's 16 rows (mma.sync): P from the S accumulators of NS
 * 8-key tiles, packed per 16-key k-step; V B-fragments by ldmatrix.trans of a row-major
 * tile in shared memory, v = the tile + this lane's offset ((lane % 16) rows, 8 (lane / 16)
 * columns), ld_bytes its row stride. */
template <typename T, int NS, int NO>
__device__ __forceinline__ void pv_mma(float (&o)[NO][4], const float (&s)[NS][4], uint32_t v, uint32_t ld_bytes) {
#pragma unroll
  for (int kk = 0; kk < NS / 2; ++kk) {
    uint32_t pa[4];
    pack_p_step<T, NS>(pa, s, kk);
#pragma unroll
    for (int n = 0; n < NO; n += 2) {
      uint32_t bv[4];
      ldsm_x4_trans(bv, v + kk * 16 * ld_bytes + n * 16);
      mma16816<T>(o[n], pa, bv[0], bv[1]);
      mma16816<T>(o[n + 1], pa, bv[2], bv[3]);
    }
  }
}

/* ------------------------------------------------------------ epilogue -- */

/* The full row sums of rows g, g + 8 (each lane of a quad holds a part) and their
 * inverses; l == 0 means every key was masked: inverse 0, so o = 0. */
__device__ __forceinline__ void quad_row_sums(float (&l)[2], float (&inv)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  }
}

/* The natural-log LSE of a row from its max m (log2 units) and full sum l; -inf if all
 * masked, NaN if a score was NaN (l is then NaN). */
__device__ __forceinline__ float lse_value(float m, float l) {
  return l > 0.0f ? (m + log2f(l)) * kLn2 : l == 0.0f ? -INFINITY : l;
}

/* One warp's 16 rows of O / l to global memory with 16-byte stores, staged through buf
 * (16 rows x LD elements of shared memory this warp owns and has finished reading): rows
 * row0 .. row0 + 15 of out (row stride stride_s elements); rows >= nrows and columns >= ncols
 * are not stored. */
template <typename T, int NO, int LD>
__device__ __forceinline__ void store_rows(const float (&o)[NO][4], const float (&inv)[2], uint16_t *buf,
                                           uint16_t *out, int64_t stride_s, int row0, int nrows, int ncols,
                                           int lane) {
  const int g = lane >> 2, c = lane & 3;
  __syncwarp();
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    const int col = 8 * n + 2 * c;
    *reinterpret_cast<uint32_t *>(buf + g * LD + col) = pack2<T>(o[n][0] * inv[0], o[n][1] * inv[0]);
    *reinterpret_cast<uint32_t *>(buf + (g + 8) * LD + col) = pack2<T>(o[n][2] * inv[1], o[n][3] * inv[1]);
  }
  __syncwarp();
#pragma unroll
  for (int e = lane; e < 16 * NO; e += 32) {
    const int r = e / NO;
    const int d = (e - r * NO) * 8;
    if (row0 + r < nrows && d < ncols)
      *reinterpret_cast<uint4 *>(out + static_cast<int64_t>(row0 + r) * stride_s + d) =
          *reinterpret_cast<const uint4 *>(buf + r * LD + d);
  }
}

}  // namespace
