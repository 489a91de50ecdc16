/*
 * attention_fwd_mma.cu: flash-attention forward on tensor cores (mma.sync, sm_80+),
 * fp16 and bf16, head dim D <= 256 (a multiple of 8). FlashAttention-2 style.
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 * Every q/k/v/o pointer and stride must be 16-byte compatible (the dispatcher
 * in attention_fwd.cu checks and falls back to the generic kernel otherwise).
 *
 * One block = 64 query rows of one (b, h), 4 warps of 16 rows each. The head
 * dim is padded to DP = the smallest of {48, 64, 80, 96, 128, 160, 192, 256}
 * that is >= D (the k-dim of Q K^T must be a multiple of 16); pad columns are
 * zero-filled in shared memory so they add nothing, and are never stored.
 *
 * Shared memory (row stride LD = DP + 8 elements, so the 8 rows an ldmatrix
 * phase reads fall in 8 distinct 16-byte bank groups):
 *   q_s [64][LD] | k_s [2][KB][LD] | v_s [2][KB][LD]      (input dtype)
 * KB = 64 keys per tile (32 for DP > 128, to bound registers and shared memory).
 * Q, K(0), V(0) arrive with cp.async; then each iteration t waits for tile t,
 * issues tile t + 1 into the other buffer and computes on tile t.
 *
 * Per warp and key tile (everything but the mma inputs is fp32 in registers):
 *   S[16][KB] = Q K^T               mma m16n8k16, Q A-fragments, K B-fragments (ldmatrix)
 *   S = S * scale * log2(e) (+ mask * log2(e)); keys >= Sk -> -inf (on full unmasked
 *       tiles the scale is folded into the exponent's FMA instead)
 *   online softmax in base 2: row max / row sum over the quad of lanes sharing a row
 *   O[16][DP] = O * alpha + P V     P re-packed in registers as A-fragments,
 *                                   V B-fragments by ldmatrix.trans of the row-major tile
 * At the end O / l goes through the warp's own rows of q_s and out with 16-byte stores.
 *
 * Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, f16/bf16 inputs,
 * f32 accumulators); lane = 4 * g + c (g = groupID = lane / 4, c = lane % 4):
 *   A 16x16 (row-major), 4 x b32 each holding 2 consecutive columns (lower index in the low half):
 *     a0 = A[g][2c, 2c+1]   a1 = A[g+8][2c, 2c+1]   a2 = A[g][2c+8, 2c+9]   a3 = A[g+8][2c+8, 2c+9]
 *   B 16x8 (k x n, "col": consecutive k of one column n packed):
 *     b0 = B[2c, 2c+1][g]   b1 = B[2c+8, 2c+9][g]
 *   C/D 16x8 fp32:
 *     c0, c1 = C[g][2c, 2c+1]   c2, c3 = C[g+8][2c, 2c+1]
 * ldmatrix.x4: lanes 8i..8i+7 give the 8 row addresses of matrix i; register i of
 * lane (4 g + c) receives row g, columns 2c, 2c+1 of matrix i (.trans: rows 2c, 2c+1
 * of column g, i.e. the transposed matrix).
 *   Q (A of S):  matrix 0 = rows 0-7, cols 0-7; 1 = rows 8-15, cols 0-7; 2 = rows 0-7,
 *                cols 8-15; 3 = rows 8-15, cols 8-15  -> lane gives row lane % 16, col 8 * (lane / 16).
 *   K (B of S, B[d][key] = K[key][d], so K's rows are B's columns, no transpose):
 *                matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15)
 *                = b0, b1 of key tile n and b0, b1 of key tile n + 1
 *                -> lane gives key lane % 8 + 8 * (lane / 16), d 8 * ((lane / 8) % 2).
 *   V (B of O, B[key][d] = V[key][d], row-major, so .trans):
 *                matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
 *                = b0, b1 of d tile n and b0, b1 of d tile n + 1
 *                -> lane gives key lane % 16, d 8 * (lane / 16).
 *   P (A of O) from the S accumulators of key tiles 2k and 2k+1 (C layout = A layout by halves):
 *                a0 = S[2k].c0c1, a1 = S[2k].c2c3, a2 = S[2k+1].c0c1, a3 = S[2k+1].c2c3.
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <atomic>
#include <type_traits>

#include "dda.h"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;  /* query rows per block */
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* Padded head dims compiled; D maps to the smallest one >= D. */
constexpr int kPadded[] = {48, 64, 80, 96, 128, 160, 192, 256};
constexpr int kNumPadded = 8;

__host__ __device__ constexpr int key_tile(int dp) { return dp <= 128 ? 64 : 32; }

/* Dynamic shared memory of one block: q_s, then double-buffered K and V tiles. */
__host__ __device__ constexpr size_t smem_bytes(int dp) {
  return static_cast<size_t>(kRows + 4 * key_tile(dp)) * (dp + 8) * 2;
}

int padded_dim(int D) {
  for (int i = 0; i < kNumPadded; ++i)
    if (D <= kPadded[i]) return kPadded[i];
  return 0;
}

/* ------------------------------------------------------- PTX wrappers -- */

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16 bytes global -> shared; src_bytes = 0 writes zeros and reads nothing. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

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

/* Stages rows [r0, r0 + ROWS) x columns [0, DP) of src (row stride `stride`
 * elements, 16-byte aligned rows) into dst (row stride DP + 8 elements) with
 * cp.async, zero-filling rows >= nrows and columns >= D. */
template <int ROWS, int DP>
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t *src, int64_t stride, int r0,
                                          int nrows, int D) {
  constexpr int kChunks = DP / 8;  /* 16-byte chunks per row */
  constexpr int kTotal = ROWS * kChunks;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += kThreads) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    if (kTotal % kThreads == 0 || c < kTotal) {
      const int r = c / kChunks;
      const int d = (c - r * kChunks) * 8;
      const bool ok = r0 + r < nrows && d < D;
      const uint16_t *g = ok ? src + static_cast<int64_t>(r0 + r) * stride + d : src;
      cp_async16(dst + static_cast<uint32_t>((r * (DP + 8) + d) * 2), g, ok ? 16 : 0);
    }
  }
}

/* ------------------------------------------------------------- kernel -- */

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
attention_fwd_mma(const dda_attention_params p, const float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int KB = key_tile(DP);
  constexpr int LD = DP + 8;          /* smem row stride, elements */
  constexpr int KS = DP / 16;         /* k-steps of S = Q K^T */
  constexpr int NS = KB / 8;          /* 8-key tiles of S */
  constexpr int NO = DP / 8;          /* 8-column tiles of O */
  constexpr bool kQInRegs = DP <= 128; /* else Q fragments are re-read from smem per tile */
  constexpr uint32_t kTileBytes = KB * LD * 2;

  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t q_s = smem_u32(smem);
  const uint32_t k_s = q_s + kRows * LD * 2;
  const uint32_t v_s = k_s + 2 * kTileBytes;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int m0 = blockIdx.x * kRows;
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;

  const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t *k = static_cast<const uint16_t *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t *v = static_cast<const uint16_t *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  load_tile<kRows, DP>(q_s, q, p.q_stride_s, m0, Sq, D);
  load_tile<KB, DP>(k_s, k, p.k_stride_s, 0, Sk, D);
  load_tile<KB, DP>(v_s, v, p.v_stride_s, 0, Sk, D);
  cp_async_commit();

  /* Per-lane ldmatrix byte offsets (see the header comment). */
  const uint32_t q_off = static_cast<uint32_t>(((warp * 16 + (lane & 15)) * LD + (lane >> 4) * 8) * 2);
  const uint32_t k_off = static_cast<uint32_t>((((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8) * 2);
  const uint32_t v_off = static_cast<uint32_t>(((lane & 15) * LD + (lane >> 4) * 8) * 2);

  const int mkind = p.mask ? static_cast<int>(p.mask_kind) : DDA_MASK_NONE;
  int64_t mrow[2] = {0, 0};  /* mask offsets of rows g and g + 8 (clamped into [0, Sq)) */
  if (mkind != DDA_MASK_NONE) {
    const int64_t mbase = b * p.mask_stride_b + h * p.mask_stride_h;
    mrow[0] = mbase + static_cast<int64_t>(min(m0 + warp * 16 + g, Sq - 1)) * p.mask_stride_q;
    mrow[1] = mbase + static_cast<int64_t>(min(m0 + warp * 16 + g + 8, Sq - 1)) * p.mask_stride_q;
  }

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  /* running row max (log2 units) of rows g, g + 8 */
  float l[2] = {0.0f, 0.0f};            /* this lane's part of the running row sums */

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? KS : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], q_s + q_off + ks * 32);
  }

  const int ntiles = (Sk + KB - 1) / KB;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * KB;
    const uint32_t kbuf = k_s + (t & 1) * kTileBytes;
    const uint32_t vbuf = v_s + (t & 1) * kTileBytes;
    /* Tile t landed, and every warp is done with tile t - 1, whose buffers tile t + 1 reuses. */
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < ntiles) {
      load_tile<KB, DP>(k_s + ((t + 1) & 1) * kTileBytes, k, p.k_stride_s, k0 + KB, Sk, D);
      load_tile<KB, DP>(v_s + ((t + 1) & 1) * kTileBytes, v, p.v_stride_s, k0 + KB, Sk, D);
      cp_async_commit();
    }

    /* S = Q K^T: s[j] is the 16x8 accumulator of keys k0 + 8j .. k0 + 8j + 7. */
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[4];
      if constexpr (kQInRegs) {
        a[0] = qf[ks][0]; a[1] = qf[ks][1]; a[2] = qf[ks][2]; a[3] = qf[ks][3];
      } else {
        ldsm_x4(a, q_s + q_off + ks * 32);
      }
#pragma unroll
      for (int j = 0; j < NS; j += 2) {
        uint32_t bk[4];
        ldsm_x4(bk, kbuf + k_off + j * 8 * LD * 2 + ks * 32);
        mma16816<T>(s[j], a, bk[0], bk[1]);
        mma16816<T>(s[j + 1], a, bk[2], bk[3]);
      }
    }

    /* Scores in log2 units are s * sc. Full unmasked tiles keep s raw and fold
     * sc = scale * log2(e) into the exponent's FMA (max(s) * sc == max(s * sc)
     * for sc > 0); other tiles are scaled and masked in place (sc = 1), keys
     * >= Sk -> -inf. Element e of s[j] is row g + 8 * (e / 2), key k0 + 8j + 2c + e % 2. */
    float sc = scale_log2;
    if (k0 + KB > Sk || mkind != DDA_MASK_NONE || !(scale_log2 > 0.0f)) {
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
      sc = 1.0f;
      switch (mkind) {
        case DDA_MASK_BOOL:
          mask_tile(s, static_cast<const unsigned char *>(p.mask), mrow, p.mask_stride_k, k0, c, Sk);
          break;
        case DDA_MASK_ADD_F32:
          mask_tile(s, static_cast<const float *>(p.mask), mrow, p.mask_stride_k, k0, c, Sk);
          break;
        case DDA_MASK_ADD_F16:
          mask_tile(s, static_cast<const __half *>(p.mask), mrow, p.mask_stride_k, k0, c, Sk);
          break;
        case DDA_MASK_ADD_BF16:
          mask_tile(s, static_cast<const __nv_bfloat16 *>(p.mask), mrow, p.mask_stride_k, k0, c, Sk);
          break;
        default:
          mask_tile(s, static_cast<const unsigned char *>(nullptr), mrow, 0, k0, c, Sk);
          break;
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }

    /* Online softmax: the 4 lanes of a quad (same g) hold one row between them. */
    float alpha[2], m_use[2];
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
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
      o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }

    /* O += P V, 16 keys per k-step. */
#pragma unroll
    for (int kk = 0; kk < KB / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < NO; n += 2) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, vbuf + v_off + kk * 16 * LD * 2 + n * 16);
        mma16816<T>(o[n], a, bv[0], bv[1]);
        mma16816<T>(o[n + 1], a, bv[2], bv[3]);
      }
    }
  }

  /* Row sums over the quad; l == 0 means every key was masked: o = 0, lse = -inf. */
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
  }

  /* O -> this warp's 16 rows of q_s (only this warp ever read them), then 16-byte stores. */
  uint16_t *qw = reinterpret_cast<uint16_t *>(smem) + warp * 16 * LD;
  __syncwarp();
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    *reinterpret_cast<uint32_t *>(qw + g * LD + 8 * n + 2 * c) = pack2<T>(o[n][0] * inv[0], o[n][1] * inv[0]);
    *reinterpret_cast<uint32_t *>(qw + (g + 8) * LD + 8 * n + 2 * c) =
        pack2<T>(o[n][2] * inv[1], o[n][3] * inv[1]);
  }
  __syncwarp();
  uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int e = lane; e < 16 * NO; e += 32) {
    const int r = e / NO;
    const int d = (e - r * NO) * 8;
    const int row = m0 + warp * 16 + r;
    if (row < Sq && d < D)
      *reinterpret_cast<uint4 *>(out + static_cast<int64_t>(row) * p.o_stride_s + d) =
          *reinterpret_cast<const uint4 *>(qw + r * LD + d);
  }

  if (p.lse && c == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (row < Sq)
        p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + row] =
            l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
#endif
}

/* ----------------------------------------------------------- launcher -- */

dda_status cuda_fail(cudaError_t e) {
  dda_set_backend_error(static_cast<int>(e));
  return DDA_ERR_CUDA;
}

template <typename T, int DP>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes(DP);
  auto kernel = attention_fwd_mma<T, DP>;
  if (smem > 48 * 1024) {
    /* Raise the dynamic shared memory limit once per device (bit per device id < 64). */
    static std::atomic<unsigned long long> raised{0};
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return cuda_fail(e);
    const unsigned long long bit = dev < 64 ? 1ull << dev : 0ull;
    if (bit == 0 || (raised.load(std::memory_order_acquire) & bit) == 0) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return cuda_fail(e);
      raised.fetch_or(bit, std::memory_order_release);
    }
  }
  const dim3 grid(static_cast<unsigned>((p->Sq + kRows - 1) / kRows), static_cast<unsigned>(p->H),
                  static_cast<unsigned>(p->B));
  kernel<<<grid, kThreads, smem, stream>>>(*p, p->scale * kLog2e);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T>
dda_status launch_dtype(const dda_attention_params *p, cudaStream_t stream) {
  switch (padded_dim(p->D)) {
    case 48: return launch<T, 48>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 80: return launch<T, 80>(p, stream);
    case 96: return launch<T, 96>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    case 160: return launch<T, 160>(p, stream);
    case 192: return launch<T, 192>(p, stream);
    case 256: return launch<T, 256>(p, stream);
    default: return DDA_ERR_UNSUPPORTED_HEAD_DIM;
  }
}

}  // namespace

/* The mma kernel's name for (compute capability major, dtype, head dim) on a
 * device with block_smem bytes of opt-in shared memory per block, or NULL when
 * it does not take them (fp32, cc < 8.0, D > 256, too little shared memory).
 * Alignment of the pointers is the caller's to check. */
const char *dda_attention_mma_name(int cc_major, dda_dtype dtype, int head_dim, size_t block_smem) {
  struct Names {
    char s[2][kNumPadded][40];
    Names() {
      for (int a = 0; a < 2; ++a)
        for (int i = 0; i < kNumPadded; ++i)
          snprintf(s[a][i], sizeof s[a][i], "mma_sm80_dp%d_kb%d_%s", kPadded[i], key_tile(kPadded[i]),
                   a == 0 ? "f16" : "bf16");
    }
  };
  static const Names names;
  if (cc_major < 8 || (dtype != DDA_F16 && dtype != DDA_BF16)) return nullptr;
  if (head_dim < 8 || head_dim % 8 != 0) return nullptr;
  const int dp = padded_dim(head_dim);
  if (dp == 0 || smem_bytes(dp) > block_smem) return nullptr;
  int i = 0;
  while (kPadded[i] != dp) ++i;
  return names.s[dtype == DDA_F16 ? 0 : 1][i];
}

/* Runs the mma kernel; the caller has checked p (dda_attention_check), that
 * dda_attention_mma_name accepts it, and that q/k/v/o are 16-byte compatible. */
dda_status dda_attention_fwd_mma(const dda_attention_params *p, cudaStream_t stream) {
  if (p->dtype == DDA_F16) return launch_dtype<__half>(p, stream);
  if (p->dtype == DDA_BF16) return launch_dtype<__nv_bfloat16>(p, stream);
  return DDA_ERR_UNSUPPORTED_DTYPE;
}
