/*
 * attention_fwd_short.cu: attention forward for short key sequences (Sk <= 128), on
 * tensor cores (mma.sync, sm_80+), fp16 and bf16, head dim D <= 160 (a multiple of 8).
 * This is cross-attention on the text encoder's 77 tokens: q from the image, k / v
 * from the prompt.
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise (usually views of the packed [B, Sk, 2, H, D])
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 * Every q/k/v/o pointer and stride must be 16-byte compatible (the dispatcher checks).
 *
 * Why a kernel of its own: with Sk <= 128 there is one key tile, so a flash-attention
 * block (load Q, K, V; one S; one P V; store) is a chain of latencies with a few
 * microseconds of work, and the general kernels spend most of their time waiting
 * (the mma kernel: 2x10x4096x77 at d64 in 20 us, where reading Q and writing O, 21 MB,
 * takes 4.5 us). Here every block loads K and V of its (b, h)
 * into shared memory once, and then each warp streams 16-row Q tiles through it:
 * the next Q tile is in flight (cp.async, per-warp double buffer) while this one is
 * computed, and O leaves through the same buffer with 16-byte stores. Softmax is
 * one pass (all keys are in one tile: no running max, no rescale of O).
 *
 * Block = 4 warps; block coordinates (chunk of TPB 16-row tiles, h, b); warp w takes tiles
 * w, w + 4, ... of its chunk. The key count is padded to SKP in {80, 128} (a multiple
 * of 16, the k-dim of P V); keys >= Sk are zero-filled and get score -inf. The head
 * dim is padded to DP in {48, 64, 80, 96, 128, 160}; pad columns are zero and never
 * stored. Shared memory (row stride LD = DP + 8 elements: the 8 rows of an ldmatrix
 * phase fall in 8 distinct 16-byte bank groups):
 *   k_s [SKP][LD] | v_s [SKP][LD] | q_s [4 warps][2 buffers][16][LD]     (input dtype)
 * e.g. DP 64, SKP 80: 23,040 + 18,432 = 41,472 bytes, 5 blocks per SM on sm_90.
 *
 * Per warp and Q tile (fragment layouts of mma.sync m16n8k16 and the ldmatrix lane
 * addressing are those of attention_fwd_mma.cu):
 *   S[16][SKP] = Q K^T       DP / 16 k-steps; Q A-fragments and K B-fragments by ldmatrix
 *   keys >= Sk -> -inf, softmax in base 2 with the scale in the exponent's FMA
 *                            (softmax_tile; with a mask: mma_common's online_softmax)
 *   O[16][DP] = P V          P re-packed in registers, V by ldmatrix.trans
 *   O / l -> the Q buffer -> global (16-byte stores; rows >= Sq, columns >= D skipped)
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <atomic>

#include "attention_common.cuh"
#include "dda.h"
#include "launch_common.cuh"
#include "mma_common.cuh"

namespace {

using dda_attn::DevInfo;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

/* Padded head dims compiled: kPaddedDims up to 160; key counts: D and Sk map to the
 * smallest one >= them. */
constexpr int kMaxDim = 160;
constexpr int kNumPadded = 6;
constexpr int kKeys[] = {80, 128};
constexpr int kNumKeys = 2;
constexpr int kMaxKeys = 128;

int padded_dim(int D) { return padded_head_dim(D, kMaxDim); }

int padded_keys(int Sk) {
  for (int i = 0; i < kNumKeys; ++i)
    if (Sk <= kKeys[i]) return kKeys[i];
  return 0;
}

__host__ __device__ constexpr size_t short_smem(int dp, int skp) {
  return static_cast<size_t>(2 * skp + kWarps * 2 * 16) * (dp + 8) * 2;
}

/* Softmax of one unmasked key tile in place (rows g, g + 8 of this warp; the C layout of
 * mma.sync): keys >= Sk -> -inf (only the 8-key tiles that reach past Sk are touched),
 * s <- 2^(s * sc - m) with the scale folded into the exponent's FMA, m = row max in log2
 * units, l = this lane's part of the row sums. Needs sc > 0 and Sk >= 1 (m is finite). */
template <int NS>
__device__ __forceinline__ void softmax_tile(float (&s)[NS][4], float (&m)[2], float (&l)[2], float sc, int Sk,
                                             int c) {
#pragma unroll
  for (int j = 0; j < NS; ++j)
    if (8 * j + 8 > Sk) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (8 * j + 2 * c + (e & 1) >= Sk) s[j][e] = -INFINITY;
    }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    m[r] = mx[r] * sc;
    l[r] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = fast_exp2(fmaf(s[j][e], sc, -m[e >> 1]));
      l[e >> 1] += s[j][e];
    }
}

template <typename T, int DP, int SKP>
__global__ void __launch_bounds__(kThreads)
attention_fwd_short(const dda_attention_params p, const int tiles_per_block) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int LD = DP + 8;  /* smem row stride, elements */
  constexpr int KS = DP / 16; /* k-steps of S = Q K^T */
  constexpr int NS = SKP / 8; /* 8-key tiles of S */
  constexpr int NO = DP / 8;  /* 8-column tiles of O */
  constexpr uint32_t kKVBytes = SKP * LD * 2;
  constexpr uint32_t kQBytes = 16 * LD * 2;

  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BlockCoords bc = block_coords(p);
  const int h = bc.h;
  const int b = bc.b;
  const float scale_log2 = p.scale_log2;
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;
  const uint32_t k_s = smem_u32(smem);
  const uint32_t v_s = k_s + kKVBytes;
  const uint32_t q_s = v_s + kKVBytes + warp * 2 * kQBytes; /* this warp's two Q buffers */

  const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t *k = static_cast<const uint16_t *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t *v = static_cast<const uint16_t *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  uint16_t *out = static_cast<uint16_t *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;

  /* This warp's 16-row tiles: first, first + 4, ... < end (tile indices within the head). */
  const int ntiles = (Sq + 15) / 16;
  const int end = min((bc.tile + 1) * tiles_per_block, ntiles);
  const int first = bc.tile * tiles_per_block + warp;

  /* Group 1: K and V (whole block). Group 2: this warp's first Q tile. */
  load_rows<SKP, DP, kThreads>(k_s, k, p.k_stride_s, 0, Sk, D, threadIdx.x);
  load_rows<SKP, DP, kThreads>(v_s, v, p.v_stride_s, 0, Sk, D, threadIdx.x);
  cp_async_commit();
  if (first < end) load_rows<16, DP, 32>(q_s, q, p.q_stride_s, first * 16, Sq, D, lane);
  cp_async_commit();
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  __syncthreads(); /* K and V from every thread are in shared memory */

  const uint32_t q_off = static_cast<uint32_t>(((lane & 15) * LD + (lane >> 4) * 8) * 2);
  const uint32_t k_off = static_cast<uint32_t>((((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8) * 2);
  const uint32_t v_off = static_cast<uint32_t>(((lane & 15) * LD + (lane >> 4) * 8) * 2);
  const int mkind = p.mask ? static_cast<int>(p.mask_kind) : DDA_MASK_NONE;
  const bool plain = mkind == DDA_MASK_NONE && scale_log2 > 0.0f;
  const int64_t mbase = b * p.mask_stride_b + h * p.mask_stride_h;

  int buf = 0;
  for (int t = first; t < end; t += kWarps, buf ^= 1) {
    const uint32_t qb = q_s + buf * kQBytes;
    /* Tile t + 4 streams into the other buffer (its last reader, tile t - 4, is done:
     * the __syncwarp at the end of the previous iteration). */
    if (t + kWarps < end)
      load_rows<16, DP, 32>(q_s + (buf ^ 1) * kQBytes, q, p.q_stride_s, (t + kWarps) * 16, Sq, D, lane);
    cp_async_commit();
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    __syncwarp();
    const int r0 = t * 16;

    /* S = Q K^T: s[j] is the 16x8 accumulator of keys 8j .. 8j + 7. */
    float s[NS][4];
    qk_mma<T, NS, KS>(s, qb + q_off, k_s + k_off, LD * 2);

    /* Softmax of the one key tile: the short form without a mask, else mma_common.cuh's
     * (scale, mask, keys >= Sk -> -inf). */
    float m[2], l[2];
    if (plain) {
      softmax_tile(s, m, l, scale_log2, Sk, c);
    } else {
      int64_t mrow[2] = {0, 0};
      if (mkind != DDA_MASK_NONE) {
        mrow[0] = mbase + static_cast<int64_t>(min(r0 + g, Sq - 1)) * p.mask_stride_q;
        mrow[1] = mbase + static_cast<int64_t>(min(r0 + g + 8, Sq - 1)) * p.mask_stride_q;
      }
      float alpha[2];
      m[0] = m[1] = -INFINITY;
      l[0] = l[1] = 0.0f;
      online_softmax<NS, true, true>(s, m, l, alpha, p, mkind, mrow, scale_log2, 0, c);
    }

    /* O = P V, 16 keys per k-step (P packed per k-step from the S registers). */
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    pv_mma<T, NS, NO>(o, s, v_s + v_off, LD * 2);

    /* O / l -> the Q buffer (every lane's ldmatrix reads of it are done), then 16-byte stores. */
    float inv[2];
    quad_row_sums(l, inv);
    store_rows<T, NO, LD>(o, inv, reinterpret_cast<uint16_t *>(smem + (qb - k_s)), out, p.o_stride_s, r0, Sq, D,
                          lane);
    if (p.lse && c == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (r0 + g + 8 * r < Sq) p.lse[(static_cast<int64_t>(b) * p.H + h) * Sq + r0 + g + 8 * r] = lse_value(m[r], l[r]);
    }
    __syncwarp(); /* the buffer is free for the load two tiles on */
  }
#endif
}

/* ----------------------------------------------------------- launcher -- */

/* Resident blocks per SM of `kernel`, per device id < 64 (read once); `cache` is the
 * caller's per-instantiation array (every instantiation has the same function type). */
template <typename Kernel>
int resident_blocks(Kernel kernel, size_t smem, std::atomic<int> (&cache)[64]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < 64) {
    const int hit = cache[dev].load(std::memory_order_acquire);
    if (hit > 0) return hit;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_release);
  return n;
}

/* Tiles per block: enough blocks for every resident slot of every SM, and at least
 * one tile per warp (fewer, larger chunks re-read K and V less often). Never fewer than
 * min(kWarps, tiles of a head), which bounds the grid (short_head_blocks). */
int tiles_per_block(const dda_attention_params *p, int sms, int resident) {
  const long long per_head = (p->Sq + 15) / 16;
  const long long total = per_head * p->B * p->H;
  const long long slots = static_cast<long long>(sms) * resident;
  long long tpb = (total + slots - 1) / slots;
  if (tpb < kWarps) tpb = kWarps;
  if (tpb > per_head) tpb = per_head;
  return static_cast<int>(tpb);
}

/* Blocks per (b, h) for tpb tiles per block. */
long long blocks_per_head(const dda_attention_params *p, long long tpb) {
  return ((p->Sq + 15) / 16 + tpb - 1) / tpb;
}

template <typename T, int DP, int SKP>
dda_status launch(const dda_attention_params *p, int sms, cudaStream_t stream) {
  constexpr size_t smem = short_smem(DP, SKP);
  auto kernel = attention_fwd_short<T, DP, SKP>;
  if (smem > 48 * 1024) {
    static std::atomic<unsigned long long> raised{0};
    const cudaError_t e = raise_smem_once(kernel, smem, raised);
    if (e != cudaSuccess) return cuda_fail(e);
  }
  static std::atomic<int> resident[64];
  const int tpb = tiles_per_block(p, sms, resident_blocks(kernel, smem, resident));
  dim3 grid;
  if (!fold_grid(blocks_per_head(p, tpb), p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, kThreads, smem, stream>>>(*p, tpb);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T, int DP>
dda_status launch_dp(const dda_attention_params *p, int sms, cudaStream_t stream) {
  if (padded_keys(p->Sk) == 80) return launch<T, DP, 80>(p, sms, stream);
  return launch<T, DP, 128>(p, sms, stream);
}

template <typename T>
dda_status launch_dtype(const dda_attention_params *p, int sms, cudaStream_t stream) {
  switch (padded_dim(p->D)) {
    case 48: return launch_dp<T, 48>(p, sms, stream);
    case 64: return launch_dp<T, 64>(p, sms, stream);
    case 80: return launch_dp<T, 80>(p, sms, stream);
    case 96: return launch_dp<T, 96>(p, sms, stream);
    case 128: return launch_dp<T, 128>(p, sms, stream);
    case 160: return launch_dp<T, 160>(p, sms, stream);
    default: return DDA_ERR_UNSUPPORTED_HEAD_DIM;
  }
}

/* ------------------------------------------------------------- family -- */

const char *short_unsupported(const dda_attention_params *p, const DevInfo &d) {
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) return dda_attn::kNeedsHalf;
  if (d.cc_major < 8) return dda_attn::kNeedsSm80;
  if (p->Sk > kMaxKeys) return "takes key lengths up to 128 only";
  if (padded_dim(p->D) == 0) return "takes head dims up to 160 only";
  if (!qkvo_aligned16(p)) return dda_attn::kNeedsAligned;
  return nullptr;
}

size_t short_smem_for(const dda_attention_params *p, const DevInfo &) {
  return short_smem(padded_dim(p->D), padded_keys(p->Sk));
}

/* At most this many: the launch's tiles per block depend on occupancy, but are never
 * fewer than min(kWarps, tiles of a head). */
long long short_head_blocks(const dda_attention_params *p, const DevInfo &) {
  const long long per_head = (p->Sq + 15) / 16;
  return blocks_per_head(p, per_head < kWarps ? per_head : kWarps);
}

bool short_preferred(const dda_attention_params *, const DevInfo &) { return true; }

const char *short_kernel(const dda_attention_params *p, const DevInfo &) {
  static const struct Names {
    char s[2][kNumPadded][kNumKeys][40];
    Names() {
      for (int a = 0; a < 2; ++a)
        for (int i = 0; i < kNumPadded; ++i)
          for (int j = 0; j < kNumKeys; ++j)
            snprintf(s[a][i][j], sizeof s[a][i][j], "short_sm80_dp%d_sk%d_%s", kPaddedDims[i], kKeys[j],
                     a == 0 ? "f16" : "bf16");
    }
  } names;
  return names.s[p->dtype == DDA_F16 ? 0 : 1][padded_index(padded_dim(p->D))][padded_keys(p->Sk) == 80 ? 0 : 1];
}

dda_status short_launch(const dda_attention_params *p, const DevInfo &d, cudaStream_t stream) {
  if (p->dtype == DDA_F16) return launch_dtype<__half>(p, d.sms, stream);
  if (p->dtype == DDA_BF16) return launch_dtype<__nv_bfloat16>(p, d.sms, stream);
  return DDA_ERR_UNSUPPORTED_DTYPE;
}

}  // namespace

/* Short key sequences (cross-attention on the text tokens): the automatic dispatch
 * runs it for every case it takes. */
const dda_attn::Family dda_attn::kShortFamily = {DDA_ATTN_SHORT, short_unsupported, short_smem_for,
                                                 short_head_blocks, short_preferred, short_kernel, short_launch};
