/*
 * attention_fwd_mma.cu: flash-attention forward on tensor cores (mma.sync, sm_80+),
 * fp16 and bf16, head dim D <= 256 (a multiple of 8). FlashAttention-2 style.
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 * Every q/k/v/o pointer and stride must be 16-byte compatible (the family refuses
 * other inputs; the automatic dispatch then runs the generic kernel).
 *
 * One block = ROWS query rows of one (b, h); three tiles (template arguments of
 * one kernel, picked per call by pick_tile from B H Sq and the SM count):
 *   m128: 4 warps x 32 rows (two 16-row m-tiles per warp, so every K / V fragment
 *         feeds two mmas), KB = 64 keys (DP <= 64) or 32; DP <= 128 only
 *   m64:  4 warps x 16 rows, KB = 64 (32 for DP > 128)
 *   m32:  2 warps x 16 rows, same KB as m64: twice the blocks for small grids
 * The head dim is padded to DP = the smallest of {48, 64, 80, 96, 128, 160, 192, 256}
 * that is >= D (the k-dim of Q K^T must be a multiple of 16); pad columns are
 * zero-filled in shared memory so they add nothing, and are never stored.
 *
 * Shared memory (row stride LD = DP + 8 elements, so the 8 rows an ldmatrix
 * phase reads fall in 8 distinct 16-byte bank groups):
 *   q_s [ROWS][LD] | k_s [2][KB][LD] | v_s [2][KB][LD]      (input dtype)
 * Q, K(0), V(0) arrive with cp.async; then each iteration t waits for tile t,
 * issues tile t + 1 into the other buffer and computes on tile t.
 *
 * Per warp, m-tile and key tile (everything but the mma inputs is fp32 in registers):
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

#include "attention_common.cuh"
#include "dda.h"
#include "launch_common.cuh"
#include "mma_common.cuh"

namespace {

using dda_attn::DevInfo;

/* Padded head dims compiled: kPaddedDims (attention_common.cuh), all of them. */
constexpr int kMaxDim = 256;

__host__ __device__ constexpr int key_tile(int dp) { return dp <= 128 ? 64 : 32; }

int padded_dim(int D) { return padded_head_dim(D, kMaxDim); }

/* load_rows (mma_common.cuh) with the thread index read through volatile asm, so the
 * per-chunk row / column indices are recomputed per call instead of hoisted out of the
 * key loop, where they held up to 32 registers (2-warp blocks, DP 256) and caused spills. */
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t *src, int64_t stride, int r0,
                                          int nrows, int D) {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  load_rows<ROWS, DP, THREADS>(dst, src, stride, r0, nrows, D, tid);
}

/* ------------------------------------------------------------- kernel -- */

/* Tile variants (template arguments of the one kernel below):
 *   WARPS  warps per block; MT  16-row m-tiles per warp; KB  keys per K/V tile.
 *   A block owns ROWS = 16 * MT * WARPS query rows; warp w owns rows
 *   [16 MT w, 16 MT (w + 1)), m-tile i of it rows 16 MT w + 16 i + [0, 16).
 * With MT = 2 every K / V fragment read by ldmatrix feeds two mmas, halving the
 * shared-memory traffic per flop (FlashAttention-2's 128-row block). */
enum Tile { kM128 = 0, kM64 = 1, kM32 = 2, kNumTiles = 3 };

__host__ __device__ constexpr bool tile_exists(int dp, int tile) { return tile != kM128 || dp <= 128; }
__host__ __device__ constexpr int tile_warps(int tile) { return tile == kM32 ? 2 : 4; }
__host__ __device__ constexpr int tile_mt(int tile) { return tile == kM128 ? 2 : 1; }
__host__ __device__ constexpr int tile_rows(int tile) { return 16 * tile_mt(tile) * tile_warps(tile); }
__host__ __device__ constexpr int tile_kb(int dp, int tile) {
  return tile == kM128 ? (dp <= 64 ? 64 : 32) : key_tile(dp);
}

/* Dynamic shared memory of one block: q_s, then double-buffered K and V tiles. */
__host__ __device__ constexpr size_t tile_smem(int dp, int tile) {
  return static_cast<size_t>(tile_rows(tile) + 4 * tile_kb(dp, tile)) * (dp + 8) * 2;
}

template <typename T, int DP, int WARPS, int MT, int KB>
__global__ void __launch_bounds__(WARPS * 32)
attention_fwd_mma(const dda_attention_params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int THREADS = WARPS * 32;
  constexpr int ROWS = 16 * MT * WARPS;  /* query rows per block */
  constexpr int LD = DP + 8;             /* smem row stride, elements */
  constexpr int KS = DP / 16;            /* k-steps of S = Q K^T */
  constexpr int NS = KB / 8;             /* 8-key tiles of S */
  constexpr int NO = DP / 8;             /* 8-column tiles of O */
  /* Q fragments stay in registers when the per-thread fp32 state (S: MT KB / 2,
   * O: MT DP / 2) leaves room for them (MT DP / 4); else re-read per key tile. */
  constexpr bool kQInRegs = DP <= 128 && MT * (KB / 2 + DP / 2 + DP / 4) <= 136;
  constexpr uint32_t kTileBytes = KB * LD * 2;

  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t q_s = smem_u32(smem);
  const uint32_t k_s = q_s + ROWS * LD * 2;
  const uint32_t v_s = k_s + 2 * kTileBytes;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BlockCoords bc = block_coords(p);
  const int h = bc.h;
  const int b = bc.b;
  const int m0 = bc.tile * ROWS;
  const int wr0 = warp * 16 * MT;  /* this warp's first row within the block */
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;

  const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t *k = static_cast<const uint16_t *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t *v = static_cast<const uint16_t *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;

  load_tile<ROWS, DP, THREADS>(q_s, q, p.q_stride_s, m0, Sq, D);
  load_tile<KB, DP, THREADS>(k_s, k, p.k_stride_s, 0, Sk, D);
  load_tile<KB, DP, THREADS>(v_s, v, p.v_stride_s, 0, Sk, D);
  cp_async_commit();

  /* Per-lane ldmatrix byte offsets (see the header comment); m-tile i of Q adds 16 i rows. */
  const uint32_t q_off = static_cast<uint32_t>(((wr0 + (lane & 15)) * LD + (lane >> 4) * 8) * 2);
  const uint32_t k_off = static_cast<uint32_t>((((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8) * 2);
  const uint32_t v_off = static_cast<uint32_t>(((lane & 15) * LD + (lane >> 4) * 8) * 2);

  const int mkind = p.mask ? static_cast<int>(p.mask_kind) : DDA_MASK_NONE;
  int64_t mrow[MT][2];  /* mask offsets of rows 16 i + g and 16 i + g + 8 (clamped into [0, Sq)) */
#pragma unroll
  for (int i = 0; i < MT; ++i) mrow[i][0] = mrow[i][1] = 0;
  if (mkind != DDA_MASK_NONE) {
    const int64_t mbase = b * p.mask_stride_b + h * p.mask_stride_h;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        mrow[i][r] = mbase + static_cast<int64_t>(min(m0 + wr0 + 16 * i + g + 8 * r, Sq - 1)) * p.mask_stride_q;
  }

  float o[MT][NO][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < NO; ++n) o[i][n][0] = o[i][n][1] = o[i][n][2] = o[i][n][3] = 0.0f;
  float m[MT][2];  /* running row max (log2 units) of rows 16 i + g, 16 i + g + 8 */
  float l[MT][2];  /* this lane's part of the running row sums */
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.0f;
  }

  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? MT : 1][kQInRegs ? KS : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[i][ks], q_s + q_off + i * 16 * LD * 2 + ks * 32);
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
      load_tile<KB, DP, THREADS>(k_s + ((t + 1) & 1) * kTileBytes, k, p.k_stride_s, k0 + KB, Sk, D);
      load_tile<KB, DP, THREADS>(v_s + ((t + 1) & 1) * kTileBytes, v, p.v_stride_s, k0 + KB, Sk, D);
      cp_async_commit();
    }

    /* S = Q K^T: s[i][j] is the 16x8 accumulator of m-tile i, keys k0 + 8j .. k0 + 8j + 7. */
    float s[MT][NS][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NS; ++j) s[i][j][0] = s[i][j][1] = s[i][j][2] = s[i][j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if constexpr (kQInRegs) {
          a[i][0] = qf[i][ks][0]; a[i][1] = qf[i][ks][1]; a[i][2] = qf[i][ks][2]; a[i][3] = qf[i][ks][3];
        } else {
          ldsm_x4(a[i], q_s + q_off + i * 16 * LD * 2 + ks * 32);
        }
      }
#pragma unroll
      for (int j = 0; j < NS; j += 2) {
        uint32_t bk[4];
        ldsm_x4(bk, kbuf + k_off + j * 8 * LD * 2 + ks * 32);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma16816<T>(s[i][j], a[i], bk[0], bk[1]);
          mma16816<T>(s[i][j + 1], a[i], bk[2], bk[3]);
        }
      }
    }

    /* Scale, mask (keys >= Sk -> -inf) and online softmax per m-tile (mma_common.cuh);
     * then O *= alpha. */
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      float alpha[2];
      online_softmax<NS, true, true>(s[i], m[i], l[i], alpha, p, mkind, mrow[i], p.scale_log2, k0, c);
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[i][n][0] *= alpha[0]; o[i][n][1] *= alpha[0];
        o[i][n][2] *= alpha[1]; o[i][n][3] *= alpha[1];
      }
    }

    /* O += P V, 16 keys per k-step; each V fragment feeds MT m-tiles. */
#pragma unroll
    for (int kk = 0; kk < KB / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        a[i][0] = pack2<T>(s[i][2 * kk][0], s[i][2 * kk][1]);
        a[i][1] = pack2<T>(s[i][2 * kk][2], s[i][2 * kk][3]);
        a[i][2] = pack2<T>(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
        a[i][3] = pack2<T>(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < NO; n += 2) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, vbuf + v_off + kk * 16 * LD * 2 + n * 16);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma16816<T>(o[i][n], a[i], bv[0], bv[1]);
          mma16816<T>(o[i][n + 1], a[i], bv[2], bv[3]);
        }
      }
    }
  }

  /* Row sums over the quad; l == 0 means every key was masked: o = 0, lse = -inf. */
  float inv[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) quad_row_sums(l[i], inv[i]);

  /* O -> this warp's 16 MT rows of q_s (only this warp ever read them), then 16-byte stores. */
  uint16_t *qw = reinterpret_cast<uint16_t *>(smem) + wr0 * LD;
  __syncwarp();
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<uint32_t *>(qw + (16 * i + g) * LD + 8 * n + 2 * c) =
          pack2<T>(o[i][n][0] * inv[i][0], o[i][n][1] * inv[i][0]);
      *reinterpret_cast<uint32_t *>(qw + (16 * i + g + 8) * LD + 8 * n + 2 * c) =
          pack2<T>(o[i][n][2] * inv[i][1], o[i][n][3] * inv[i][1]);
    }
  __syncwarp();
  uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
  for (int e = lane; e < 16 * MT * NO; e += 32) {
    const int r = e / NO;
    const int d = (e - r * NO) * 8;
    const int row = m0 + wr0 + r;
    if (row < Sq && d < D)
      *reinterpret_cast<uint4 *>(out + static_cast<int64_t>(row) * p.o_stride_s + d) =
          *reinterpret_cast<const uint4 *>(qw + r * LD + d);
  }

  if (p.lse && c == 0) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + wr0 + 16 * i + g + 8 * r;
        if (row < Sq)
          p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + row] = lse_value(m[i][r], l[i][r]);
      }
  }
#endif
}

/* ----------------------------------------------------------- launcher -- */

/* The tile for a problem: the largest that still gives every SM work.
 *   m128 when it makes >= 2 blocks per SM (2 x 4 warps resident per SM) and
 *        Sk > 128 (short key loops, e.g. the 77 text tokens of cross-attention,
 *        are latency bound: m64's smaller register file fits more blocks per SM),
 *   m64  when it makes >= 1 block per SM,
 *   m32  otherwise (small B H Sq, e.g. 2x8x256: 64 blocks of 64 rows on 132 SMs).
 * Tiles that do not exist for DP or do not fit block_smem are skipped. */
int pick_tile(int dp, const dda_attention_params *p, const DevInfo &dev) {
  const long long bh = static_cast<long long>(p->B) * p->H;
  const long long blocks128 = bh * ((p->Sq + 127) / 128);
  const long long blocks64 = bh * ((p->Sq + 63) / 64);
  if (tile_exists(dp, kM128) && tile_smem(dp, kM128) <= dev.block_smem && blocks128 >= 2LL * dev.sms &&
      p->Sk > 128)
    return kM128;
  if (blocks64 >= dev.sms) return kM64;
  return kM32;
}

template <typename T, int DP, int TILE>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  constexpr int kWarps = tile_warps(TILE);
  constexpr int kRowsPerBlock = tile_rows(TILE);
  constexpr size_t smem = tile_smem(DP, TILE);
  auto kernel = attention_fwd_mma<T, DP, kWarps, tile_mt(TILE), tile_kb(DP, TILE)>;
  if (smem > 48 * 1024) {
    static std::atomic<unsigned long long> raised{0};
    const cudaError_t e = raise_smem_once(kernel, smem, raised);
    if (e != cudaSuccess) return cuda_fail(e);
  }
  dim3 grid;
  if (!fold_grid((p->Sq + kRowsPerBlock - 1) / kRowsPerBlock, p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, kWarps * 32, smem, stream>>>(*p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T, int DP>
dda_status launch_dp(const dda_attention_params *p, const DevInfo &dev, cudaStream_t stream) {
  switch (pick_tile(DP, p, dev)) {
    case kM128:
      if constexpr (tile_exists(DP, kM128)) return launch<T, DP, kM128>(p, stream);
      return DDA_ERR_UNSUPPORTED_HEAD_DIM;
    case kM32: return launch<T, DP, kM32>(p, stream);
    default: return launch<T, DP, kM64>(p, stream);
  }
}

template <typename T>
dda_status launch_dtype(const dda_attention_params *p, const DevInfo &dev, cudaStream_t stream) {
  switch (padded_dim(p->D)) {
    case 48: return launch_dp<T, 48>(p, dev, stream);
    case 64: return launch_dp<T, 64>(p, dev, stream);
    case 80: return launch_dp<T, 80>(p, dev, stream);
    case 96: return launch_dp<T, 96>(p, dev, stream);
    case 128: return launch_dp<T, 128>(p, dev, stream);
    case 160: return launch_dp<T, 160>(p, dev, stream);
    case 192: return launch_dp<T, 192>(p, dev, stream);
    case 256: return launch_dp<T, 256>(p, dev, stream);
    default: return DDA_ERR_UNSUPPORTED_HEAD_DIM;
  }
}

/* Kernel names per (dtype, padded head dim, tile). Built once (function-local static). */
struct Names {
  char one[2][kNumPaddedDims][kNumTiles][40];
  Names() {
    for (int a = 0; a < 2; ++a)
      for (int i = 0; i < kNumPaddedDims; ++i) {
        const int dp = kPaddedDims[i];
        for (int t = 0; t < kNumTiles; ++t)
          snprintf(one[a][i][t], sizeof one[a][i][t], "mma_sm80_dp%d_m%d_kb%d_%s", dp, tile_rows(t),
                   tile_kb(dp, t), a == 0 ? "f16" : "bf16");
      }
  }
};

/* ------------------------------------------------------------- family -- */

const char *mma_unsupported(const dda_attention_params *p, const DevInfo &d) {
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) return dda_attn::kNeedsHalf;
  if (d.cc_major < 8) return dda_attn::kNeedsSm80;
  if (padded_dim(p->D) == 0) return "takes head dims up to 256 (d512 takes larger ones)";
  if (!qkvo_aligned16(p)) return dda_attn::kNeedsAligned;
  return nullptr;
}

/* The m64 tile's: the largest tile that must fit (m128 runs only where it fits too). */
size_t mma_smem(const dda_attention_params *p, const DevInfo &) { return tile_smem(padded_dim(p->D), kM64); }

long long mma_head_blocks(const dda_attention_params *p, const DevInfo &d) {
  const int rows = tile_rows(pick_tile(padded_dim(p->D), p, d));
  return (p->Sq + rows - 1) / rows;
}

bool mma_preferred(const dda_attention_params *, const DevInfo &) { return true; }

const char *mma_kernel(const dda_attention_params *p, const DevInfo &d) {
  static const Names names;
  const int dp = padded_dim(p->D);
  return names.one[p->dtype == DDA_F16 ? 0 : 1][padded_index(dp)][pick_tile(dp, p, d)];
}

dda_status mma_launch(const dda_attention_params *p, const DevInfo &d, cudaStream_t stream) {
  if (p->dtype == DDA_F16) return launch_dtype<__half>(p, d, stream);
  if (p->dtype == DDA_BF16) return launch_dtype<__nv_bfloat16>(p, d, stream);
  return DDA_ERR_UNSUPPORTED_DTYPE;
}

}  // namespace

const dda_attn::Family dda_attn::kMmaFamily = {DDA_ATTN_MMA, mma_unsupported, mma_smem, mma_head_blocks,
                                               mma_preferred, mma_kernel, mma_launch};
