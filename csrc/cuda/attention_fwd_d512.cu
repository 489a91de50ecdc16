/*
 * attention_fwd_d512.cu: flash-attention forward on tensor cores (mma.sync, sm_80+),
 * fp16 and bf16, large head dims 256 < D <= 512 (a multiple of 8), e.g. the
 * Stable Diffusion VAE mid-block (1 head, D = 512).
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 * Every q/k/v/o pointer and stride must be 16-byte compatible (the family refuses
 * other inputs; the automatic dispatch then runs the generic kernel).
 *
 * Why the output columns are split across two blocks: the fp32 accumulator of
 * 64 rows x 512 columns is 128 KB, more than 4 warps' registers can hold. So
 * each block computes 64 query rows x one half of the output columns
 * (DV = 256: columns [0, 256) or [256, 512)), and recomputes S = Q K^T over
 * the full head dim. That costs 1.5x the tensor-core work of a single pass,
 * but keeps the whole FlashAttention-2 loop in registers (P never leaves
 * them, no block-wide exchange of P or of rescale factors) and doubles the
 * number of blocks, which the VAE needs (1 head, Sq = 4096: 64 row tiles
 * would leave half of a 132-SM part idle; with the split, 128 blocks). The two
 * halves of a row tile are adjacent in the block order, so they run together and
 * share Q, K and V through L2.
 *
 * The head dim is padded to DQ = 512 for Q K^T (zero-filled columns add
 * nothing); V and O columns past D are zero-filled / never stored.
 *
 * Block = 4 warps x 16 query rows. Shared memory (row strides LDQ = DQ + 8 and
 * LDV = DV + 8 elements: the 8 rows an ldmatrix phase reads fall in 8 distinct
 * 16-byte bank groups):
 *   q_s [64][LDQ] | k_s [2][KB][LDQ] | v_s [2][KB][LDV]      (input dtype)
 *   = 66,560 + 66,560 + 33,792 = 166,912 bytes with KB = 32 keys per tile,
 * which is exactly the opt-in limit of sm_80 (sm_86/89 parts have less and use
 * the generic kernel). Q stays in shared memory (its 16 x 512 A-fragments
 * would be another 128 registers) and is re-read with ldmatrix per k-step.
 * K and V tiles are double-buffered with cp.async: tile t + 1 streams in
 * while tile t is computed.
 *
 * Per warp and key tile (registers: O 16 x 256 fp32 = 128 per lane, S 16):
 *   S[16][32] = Q K^T               mma m16n8k16, 32 k-steps over DQ
 *   scale, mask, keys >= Sk -> -inf; online softmax in base 2 (exp2)
 *   O[16][DV] = O * alpha + P V     P re-packed in registers as A-fragments,
 *                                   V B-fragments by ldmatrix.trans
 *
 * Fragment layouts of mma.sync.aligned.m16n8k16.row.col (PTX ISA, f16/bf16 in,
 * f32 accumulate); lane = 4 g + c:
 *   A 16x16: a0 = A[g][2c, 2c+1]  a1 = A[g+8][2c, 2c+1]  a2 = A[g][2c+8, +9]  a3 = A[g+8][2c+8, +9]
 *   B 16x8:  b0 = B[2c, 2c+1][g]  b1 = B[2c+8, 2c+9][g]
 *   C 16x8:  c0, c1 = C[g][2c, 2c+1]  c2, c3 = C[g+8][2c, 2c+1]
 * ldmatrix.x4: lanes 8i..8i+7 address the 8 rows of matrix i; register i of
 * lane 4g + c gets row g, columns 2c, 2c+1 of matrix i (.trans: the transpose).
 *   Q (A of S): lane addresses row lane % 16, column 8 (lane / 16).
 *   K (B of S, K's rows are B's columns): key lane % 8 + 8 (lane / 16),
 *               column 8 ((lane / 8) % 2)  -> b0, b1 of key tiles n and n + 1.
 *   V (B of O, row-major, .trans): key lane % 16, column 8 (lane / 16)
 *               -> b0, b1 of column tiles n and n + 1.
 *   P (A of O) from S tiles 2k, 2k + 1: a0 = S[2k].c0c1, a1 = S[2k].c2c3,
 *               a2 = S[2k+1].c0c1, a3 = S[2k+1].c2c3.
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

#include "attention_common.cuh"
#include "dda.h"
#include "launch_common.cuh"
#include "mma_common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;  /* query rows per block */
constexpr int kKB = 32;             /* keys per tile */
constexpr int kDQ = 512;            /* padded head dim of Q K^T */
constexpr int kDV = 256;            /* output columns per block */
constexpr int kSplit = kDQ / kDV;   /* blocks per row tile */
constexpr int kLDQ = kDQ + 8;       /* q_s / k_s row stride, elements */
constexpr int kLDV = kDV + 8;       /* v_s row stride, elements */

constexpr uint32_t kQBytes = kRows * kLDQ * 2;
constexpr uint32_t kKTileBytes = kKB * kLDQ * 2;
constexpr uint32_t kVTileBytes = kKB * kLDV * 2;
constexpr size_t kSmemBytes = kQBytes + 2 * kKTileBytes + 2 * kVTileBytes;

/* Stages rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of src (row stride
 * `stride` elements, 16-byte aligned rows) into dst (row stride LD elements)
 * with cp.async, zero-filling rows >= nrows and columns >= D. */
template <int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t *src, int64_t stride, int r0,
                                          int nrows, int c0, int D) {
  constexpr int kChunks = COLS / 8;  /* 16-byte chunks per row */
  constexpr int kTotal = ROWS * kChunks;
  static_assert(kTotal % kThreads == 0, "tile chunks must divide evenly among the threads");
#pragma unroll
  for (int i = 0; i < kTotal; i += kThreads) {
    const int chunk = i + static_cast<int>(threadIdx.x);
    const int r = chunk / kChunks;
    const int d = (chunk - r * kChunks) * 8;
    const bool ok = r0 + r < nrows && c0 + d < D;
    const uint16_t *g = ok ? src + static_cast<int64_t>(r0 + r) * stride + c0 + d : src;
    cp_async16(dst + static_cast<uint32_t>((r * LD + d) * 2), g, ok ? 16 : 0);
  }
}

/* ------------------------------------------------------------- kernel -- */

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
attention_fwd_d512(const dda_attention_params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int KS = kDQ / 16;  /* k-steps of S = Q K^T */
  constexpr int NS = kKB / 8;   /* 8-key tiles of S */
  constexpr int NO = kDV / 8;   /* 8-column tiles of O */

  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t q_s = smem_u32(smem);
  const uint32_t k_s = q_s + kQBytes;
  const uint32_t v_s = k_s + 2 * kKTileBytes;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BlockCoords bc = block_coords(p);
  const int half = bc.tile % kSplit;            /* which output columns */
  const int d0 = half * kDV;                    /* first output column */
  const int m0 = (bc.tile / kSplit) * kRows;    /* first query row */
  const int h = bc.h;
  const int b = bc.b;
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;

  const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t *k = static_cast<const uint16_t *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t *v = static_cast<const uint16_t *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  load_tile<kRows, kDQ, kLDQ>(q_s, q, p.q_stride_s, m0, Sq, 0, D);
  load_tile<kKB, kDQ, kLDQ>(k_s, k, p.k_stride_s, 0, Sk, 0, D);
  load_tile<kKB, kDV, kLDV>(v_s, v, p.v_stride_s, 0, Sk, d0, D);
  cp_async_commit();

  /* Per-lane ldmatrix byte offsets (see the header comment). */
  const uint32_t q_off = static_cast<uint32_t>(((warp * 16 + (lane & 15)) * kLDQ + (lane >> 4) * 8) * 2);
  const uint32_t k_off = static_cast<uint32_t>((((lane & 7) + (lane >> 4) * 8) * kLDQ + ((lane >> 3) & 1) * 8) * 2);
  const uint32_t v_off = static_cast<uint32_t>(((lane & 15) * kLDV + (lane >> 4) * 8) * 2);

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

  const int ntiles = (Sk + kKB - 1) / kKB;
  for (int t = 0; t < ntiles; ++t) {
    const int k0 = t * kKB;
    const uint32_t kbuf = k_s + (t & 1) * kKTileBytes;
    const uint32_t vbuf = v_s + (t & 1) * kVTileBytes;
    /* Tile t landed, and every warp is done with tile t - 1, whose buffers tile t + 1 reuses. */
    cp_async_wait_all();
    __syncthreads();
    if (t + 1 < ntiles) {
      load_tile<kKB, kDQ, kLDQ>(k_s + ((t + 1) & 1) * kKTileBytes, k, p.k_stride_s, k0 + kKB, Sk, 0, D);
      load_tile<kKB, kDV, kLDV>(v_s + ((t + 1) & 1) * kVTileBytes, v, p.v_stride_s, k0 + kKB, Sk, d0, D);
      cp_async_commit();
    }

    /* S = Q K^T: s[j] is the 16x8 accumulator of keys k0 + 8j .. k0 + 8j + 7. */
    float s[NS][4];
    qk_mma<T, NS, KS>(s, q_s + q_off, kbuf + k_off, kLDQ * 2);

    /* Scale, mask (keys >= Sk -> -inf) and online softmax (mma_common.cuh). */
    float alpha[2];
    online_softmax<NS, true, true>(s, m, l, alpha, p, mkind, mrow, p.scale_log2, k0, c);
    /* The 128 accumulator registers are rescaled only when some row's max moved
     * (alpha is exactly 1 otherwise); after the first tiles it rarely does. */
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
        o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
      }
    }

    /* O += P V, 16 keys per k-step. */
    pv_mma<T, NS, NO>(o, s, vbuf + v_off, kLDV * 2);
  }

  /* O -> this warp's 16 rows of q_s (only this warp ever reads them), then 16-byte stores. */
  float inv[2];
  quad_row_sums(l, inv);
  uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  store_rows<T, NO, kLDQ>(o, inv, reinterpret_cast<uint16_t *>(smem) + warp * 16 * kLDQ, out + d0, p.o_stride_s,
                          m0 + warp * 16, Sq, D - d0, lane);

  if (p.lse && half == 0 && c == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + g + 8 * r;
      if (row < Sq) p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + row] = lse_value(m[r], l[r]);
    }
  }
#endif
}

/* ----------------------------------------------------------- launcher -- */

/* Blocks per (b, h): kSplit column halves of every kRows-row tile. */
long long tiles_per_head(const dda_attention_params *p) {
  return static_cast<long long>((p->Sq + kRows - 1) / kRows) * kSplit;
}

template <typename T>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  auto kernel = attention_fwd_d512<T>;
  static std::atomic<unsigned long long> raised{0};
  cudaError_t e = raise_smem_once(kernel, kSmemBytes, raised);
  if (e != cudaSuccess) return cuda_fail(e);
  dim3 grid;
  if (!fold_grid(tiles_per_head(p), p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(*p);
  e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

/* ------------------------------------------------------------- family -- */

const char *d512_unsupported(const dda_attention_params *p, const dda_attn::DevInfo &d) {
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) return dda_attn::kNeedsHalf;
  if (d.cc_major < 8) return dda_attn::kNeedsSm80;
  if (p->D <= 256) return "takes head dims above 256 only (mma takes the others)";
  if (!qkvo_aligned16(p)) return dda_attn::kNeedsAligned;
  return nullptr;
}

size_t d512_smem(const dda_attention_params *, const dda_attn::DevInfo &) { return kSmemBytes; }

long long d512_head_blocks(const dda_attention_params *p, const dda_attn::DevInfo &) { return tiles_per_head(p); }

bool d512_preferred(const dda_attention_params *, const dda_attn::DevInfo &) { return true; }

const char *d512_kernel(const dda_attention_params *p, const dda_attn::DevInfo &) {
  return p->dtype == DDA_F16 ? "mma_d512_m64_kb32_dv256_f16" : "mma_d512_m64_kb32_dv256_bf16";
}

dda_status d512_launch(const dda_attention_params *p, const dda_attn::DevInfo &, cudaStream_t stream) {
  if (p->dtype == DDA_F16) return launch<__half>(p, stream);
  if (p->dtype == DDA_BF16) return launch<__nv_bfloat16>(p, stream);
  return DDA_ERR_UNSUPPORTED_DTYPE;
}

}  // namespace

/* Head dims 256 < D <= 512 (the VAE mid-block); needs sm_80's 163 KB of shared memory. */
const dda_attn::Family dda_attn::kD512Family = {DDA_ATTN_D512, d512_unsupported, d512_smem, d512_head_blocks,
                                                d512_preferred, d512_kernel, d512_launch};
