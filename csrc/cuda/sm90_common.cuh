/* sm90_common.cuh: what the two Hopper attention kernels share
 * (attention_fwd_sm90.cu: cp.async, all warpgroups compute; attention_fwd_sm90_tma.cu:
 * TMA producer warpgroup + consumer warpgroups): wgmma fences, shared-memory matrix
 * descriptors and the online softmax of one key tile in the m64nN accumulator layout.
 *
 * Accumulator layout of wgmma m64nNk16 (fp32): warp w of the warpgroup owns rows
 * 16 w .. 16 w + 15; lane = 4 g + c holds d[4 j + e] = D[16 w + g + 8 (e / 2)][8 j + 2 c + e % 2]
 * (the m16n8 C layout of mma.sync, N / 8 tiles per warp). */
#pragma once

#include <math.h>
#include <stdint.h>

#include "dda.h"
#include "mma_common.cuh"

namespace {

/* Device helpers exist only where sm_90a kernel bodies are compiled (host pass, sm_90a). */
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* Waits until at most N committed wgmma groups are pending (groups complete in order). */
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

/* Pins the accumulator registers at this point of the program: the compiler may
 * not move reads (or writes) of r across it, so reads after wgmma_wait<N>() stay there. */
template <int N>
__device__ __forceinline__ void fence_regs(float *r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

/* Matrix descriptor (PTX "matrix descriptor" of wgmma): start address, leading and
 * stride byte offsets, layout (0 = no swizzle, 1 = 128-byte swizzle). */
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo, uint32_t layout = 0) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (static_cast<uint64_t>(layout) << 62);
}

/* Online softmax of one key tile of S in place, for the 16 rows of this warp:
 *   s <- 2^(s * sc - m_new) (fp32), m (running row max, log2 units) and l (this lane's
 *   part of the running row sums) updated, alpha = 2^(m_old - m_new) for rows g, g + 8.
 * Scores in log2 units are s * sc with sc = scale * log2(e); full unmasked tiles fold sc
 * into the exponent's FMA. Keys >= Sk get -inf; MASK adds p.mask (kind mkind) through
 * the row offsets mrow (rows g, g + 8). k0 is the tile's first key. */
template <int NS, bool MASK>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               const dda_attention_params &p, int mkind, const int64_t (&mrow)[2],
                                               float scale_log2, int k0, int c) {
  float sc = scale_log2;
  if (k0 + NS * 8 > p.Sk || MASK || !(scale_log2 > 0.0f)) {
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

/* P (the exponentials in s) as wgmma A fragments from registers: k-step kk = keys
 * 16 kk .. 16 kk + 15 = S tiles 2 kk, 2 kk + 1 (the A layout of mma.sync m16n8k16). */
template <typename T, int NS>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[NS / 2][4], const float (&s)[NS][4]) {
#pragma unroll
  for (int kk = 0; kk < NS / 2; ++kk) {
    pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

/* O / l to global (4-byte stores of column pairs; rows >= Sq and columns >= D skipped)
 * and the LSE (natural log) of rows g, g + 8 of this warp, row0 = the warp's first row. */
template <typename T, int NO>
__device__ __forceinline__ void store_o(const float (&o)[NO][4], float (&l)[2], const float (&m)[2],
                                        const dda_attention_params &p, int b, int h, int row0, int g, int c) {
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  /* l == 0: every key masked, o = 0, lse = -inf */
  }
  uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    if (row >= p.Sq) continue;
    uint16_t *orow = out + static_cast<int64_t>(row) * p.o_stride_s + 2 * c;
#pragma unroll
    for (int n = 0; n < NO; ++n)
      if (8 * n < p.D)
        *reinterpret_cast<uint32_t *>(orow + 8 * n) = pack2<T>(o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
    if (p.lse && c == 0)
      p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Sq + row] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

#endif  // host pass or sm_90a

}  // namespace
