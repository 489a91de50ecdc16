/*
 * attention_fwd_sm90.cu: flash-attention forward on Hopper warpgroup MMAs
 * (wgmma.mma_async, sm_90a only), fp16 and bf16, head dim D <= 256 (a multiple of 8).
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise (views of the packed [B, S, 3, H, D] / [B, Sk, 2, H, D])
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *   mask broadcast to [B, H, Sq, Sk] through four element strides, or NULL
 * Every q/k/v/o pointer and stride must be 16-byte compatible (the dispatcher checks).
 *
 * One block = 2 warpgroups (256 threads) x 64 query rows = 128 rows of one (b, h).
 * The head dim is padded to DP = the smallest of {48, 64, 80, 96, 128, 160, 192, 256}
 * that is >= D (the k-dim of Q K^T must be a multiple of 16): d40 runs as 48, d80 and
 * d160 at their own size. Pad columns are zero-filled in shared memory. Keys per
 * tile KB = 128 up to DP 96, 64 up to DP 160, 32 above (registers and shared memory).
 *
 * Shared memory, all tiles in the "interleaved" (no-swizzle) wgmma layout: 8 x 8
 * core matrices of 128 contiguous bytes. Element (row r, column d) of a tile with
 * DP columns sits at byte
 *     (r / 8) * RG + (d / 8) * 128 + (r % 8) * 16 + (d % 8) * 2,    RG = 16 DP
 * i.e. chunk i = 16-byte piece (r % 8 = i % 8, d / 8 = (i / 8) % (DP / 8), r / 8 =
 * i / DP) sits at byte 16 i, so cp.async fills a tile with contiguous 16-byte writes.
 *   q_s [128][DP] | kv_s [4 stages][K tile, V tile][KB][DP]
 * Descriptors (PTX "matrix descriptor"; LBO / SBO in bytes):
 *   Q, A of S = Q K^T, K-major:  LBO = 128 (next 8 columns), SBO = RG (next 8 rows);
 *                                 k-step of 16 columns: start += 256 bytes
 *   K, B of S, K-major:           the same (rows = keys)
 *   V, B of O += P V, MN-major (imm-trans-b = 1; B[key][d] = V[key][d], d contiguous):
 *                                 SBO = 128 (next 8 d), LBO = RG (next 8 keys);
 *                                 k-step of 16 keys: start += 2 RG bytes
 *
 * Pipeline (FlashAttention-3's intra-warpgroup overlap, without warp specialisation):
 * K/V tiles stream through 4 stages with cp.async, two tiles ahead, so S of the next
 * tile can be issued before the softmax of this one. Iteration t, per warpgroup:
 *   A  wait for tile t + 1 (cp.async), fence.proxy.async, __syncthreads (every warpgroup
 *      is past iteration t - 1, so stage (t + 2) % 4, last read by P V of tile t - 2, is free);
 *      issue tile t + 2 into it
 *   B  issue S' = Q K(t+1)^T                      (async; tensor cores busy ...)
 *   C  softmax of S = Q K(t)^T in registers      (... while this runs)
 *   D  wait for O += P V(t-1), rescale O, issue O += P V(t)   (async)
 *   E  wait for S', S = S'
 * Scale, mask and online softmax in base 2 are exactly attention_fwd_mma.cu's (the m64nN
 * accumulator layout is the m16n8 C layout of mma.sync: per warp 16 rows, N / 8 tiles);
 * P is re-packed in registers as A fragments (the A layout of mma.sync m16n8k16).
 * At the end O / l is stored from registers (4-byte stores; rows >= Sq, columns >= D skipped).
 *
 * Accumulator layout of wgmma m64nNk16 (fp32): warp w of the warpgroup owns rows
 * 16 w .. 16 w + 15; lane = 4 g + c holds d[4 j + e] = D[16 w + g + 8 (e / 2)][8 j + 2 c + e % 2].
 * A from registers (m64k16): a0 = A[g][2c, 2c+1], a1 = A[g+8][2c, 2c+1], a2 = A[g][2c+8, 2c+9],
 * a3 = A[g+8][2c+8, 2c+9] (rows relative to 16 w), as mma.sync.
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
#include "sm90_common.cuh"
#include "wgmma_ops.cuh"

namespace {

using dda_attn::DevInfo;

/* Padded head dims compiled: kPaddedDims (attention_common.cuh), all of them. */
constexpr int kMaxDim = 256;
constexpr int kStages = 3;  /* K/V tiles in flight: t (P V), t + 1 (S), t + 2 (loading) */

__host__ __device__ constexpr int sm90_kb(int dp) { return dp <= 64 ? 128 : dp <= 192 ? 64 : 32; }
/* Warpgroups (64 query rows each) per block: 3 up to DP 128 (fewer K/V re-reads from
 * L2 per flop, 3 warps per scheduler; fits 168 registers per thread), else 2. */
__host__ __device__ constexpr int sm90_wg(int dp) { return dp <= 128 ? 3 : 2; }

__host__ __device__ constexpr size_t sm90_smem(int dp) {
  return static_cast<size_t>(64 * sm90_wg(dp) + 2 * kStages * sm90_kb(dp)) * dp * 2;
}

int padded_dim(int D) { return padded_head_dim(D, kMaxDim); }

/* ------------------------------------------------------- PTX wrappers -- */
/* Device helpers exist only where the kernel body is compiled (host pass, sm_90a). */
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)

/* Orders this thread's generic-proxy shared-memory writes (cp.async) before later
 * async-proxy reads (wgmma operands); followed by a barrier for the other threads. */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* Stages rows [r0, r0 + ROWS) x columns [0, DP) of src (row stride `stride`
 * elements) into dst in the interleaved layout (chunk i at byte 16 i, see the
 * header), zero-filling rows >= nrows and columns >= D. */
template <int ROWS, int DP, int THREADS>
__device__ __forceinline__ void load_il(uint32_t dst, const uint16_t *src, int64_t stride, int r0, int nrows,
                                        int D) {
  constexpr int kChunks = DP / 8;
  constexpr int kTotal = ROWS * kChunks;
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
#pragma unroll
  for (int i0 = 0; i0 < kTotal; i0 += THREADS) {
    const int i = i0 + tid;
    if (kTotal % THREADS == 0 || i < kTotal) {
      const int rest = i >> 3;
      const int row = (rest / kChunks) * 8 + (i & 7);
      const int d = (rest % kChunks) * 8;
      const bool ok = r0 + row < nrows && d < D;
      const uint16_t *g = ok ? src + static_cast<int64_t>(r0 + row) * stride + d : src;
      cp_async16(dst + static_cast<uint32_t>(i) * 16, g, ok ? 16 : 0);
    }
  }
}

#endif  // host pass or sm_90a

/* ------------------------------------------------------------- kernel -- */

template <typename T, int DP, int KB, int WG, bool MASK>
__global__ void __launch_bounds__(WG * 128, 1)
attention_fwd_sm90(const dda_attention_params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int THREADS = WG * 128;
  constexpr int ROWS = WG * 64;
  constexpr uint32_t RG = DP * 16;             /* bytes per 8-row group */
  constexpr uint32_t kTileBytes = KB * DP * 2;
  constexpr int NS = KB / 8;                   /* 8-key column tiles of S */
  constexpr int NO = DP / 8;                   /* 8-column tiles of O */

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t q_s = smem_u32(smem);
  const uint32_t kv_s = q_s + ROWS * DP * 2;   /* stage i: K at kv_s + 2 i kTileBytes, V after it */

  const int lane = threadIdx.x & 31;
  const int wg = threadIdx.x >> 7;
  const int warp = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BlockCoords bc = block_coords(p);
  const int h = bc.h;
  const int b = bc.b;
  const int m0 = bc.tile * ROWS;
  const int wr0 = wg * 64 + warp * 16;  /* this warp's first row within the block */
  const int D = p.D, Sq = p.Sq, Sk = p.Sk;

  const uint16_t *q = static_cast<const uint16_t *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t *k = static_cast<const uint16_t *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
  const uint16_t *v = static_cast<const uint16_t *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
  const int ntiles = (Sk + KB - 1) / KB;

  /* Tile t -> stage t % kStages. */
  auto load_kv = [&](int t) {
    const uint32_t st = kv_s + (t % kStages) * 2 * kTileBytes;
    load_il<KB, DP, THREADS>(st, k, p.k_stride_s, t * KB, Sk, D);
    load_il<KB, DP, THREADS>(st + kTileBytes, v, p.v_stride_s, t * KB, Sk, D);
  };
  load_il<ROWS, DP, THREADS>(q_s, q, p.q_stride_s, m0, Sq, D);
  load_kv(0);
  cp_async_commit();
  if (ntiles > 1) load_kv(1);
  cp_async_commit();  /* possibly empty: keeps the group count uniform */

  /* MASK: p.mask is set (a separate instantiation: the mask code's registers would
   * make the unmasked kernel spill). */
  const int mkind = MASK ? static_cast<int>(p.mask_kind) : DDA_MASK_NONE;
  int64_t mrow[2] = {0, 0};  /* mask offsets of rows g and g + 8 of this warp (clamped into [0, Sq)) */
  if (MASK) {
    const int64_t mbase = b * p.mask_stride_b + h * p.mask_stride_h;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      mrow[r] = mbase + static_cast<int64_t>(min(m0 + wr0 + g + 8 * r, Sq - 1)) * p.mask_stride_q;
  }

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  /* running row max (log2 units) of rows g, g + 8 */
  float l[2] = {0.0f, 0.0f};            /* this lane's part of the running row sums */

  const uint64_t q_desc = make_desc(q_s + wg * 8 * RG, 128, RG);
  /* S = Q K(t)^T into s (async; the caller commits and waits). */
  auto issue_s = [&](float *s, int t) {
    const uint64_t k_desc = make_desc(kv_s + (t % kStages) * 2 * kTileBytes, 128, RG);
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) wgmma_ss<KB, T>(s, q_desc + ks * 16, k_desc + ks * 16, ks);
  };

  float s[NS][4];            /* S of the next tile, then its exponentials */
  float alpha[2] = {0.0f, 0.0f};  /* O's rescale factor for the P held in s */

  auto softmax = [&](int tile) {
    online_softmax<NS, MASK>(s, m, l, alpha, p, mkind, mrow, p.scale_log2, tile * KB, c);
  };

  /* Prologue: Q and tile 0 landed; S of tile 0 and its softmax. */
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  fence_proxy_async();
  __syncthreads();
  wgmma_fence();
  issue_s(&s[0][0], 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs<KB / 2>(&s[0][0]);
  softmax(0);

  for (int t = 0; t < ntiles; ++t) {
    const bool has_next = t + 1 < ntiles;
    /* P(t) as A fragments: k-step kk = keys 16 kk .. 16 kk + 15 = S tiles 2 kk, 2 kk + 1. */
    uint32_t pa[KB / 16][4];
    pack_p<T, NS>(pa, s);
    /* A: tile t + 1 landed; the stage of tile t + 2 (last read in iteration t - 1) is free. */
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    if (t + 2 < ntiles) {
      load_kv(t + 2);
      cp_async_commit();
    }
    /* B: S = Q K(t+1)^T (the last tile recomputes its own: every iteration issues the
     * same wgmma groups, which ptxas needs to keep them asynchronous). */
    wgmma_fence();
    issue_s(&s[0][0], has_next ? t + 1 : t);
    wgmma_commit();
    /* C: O = O * alpha(t) + P(t) V(t). */
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
      o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
    const uint64_t v_desc = make_desc(kv_s + (t % kStages) * 2 * kTileBytes + kTileBytes, RG, 128);
    fence_regs<DP / 2>(&o[0][0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KB / 16; ++kk)
      wgmma_rs<DP, T>(&o[0][0], pa[kk], v_desc + kk * (2 * RG >> 4), 1);
    wgmma_commit();
    /* D: S landed; its softmax runs while P V(t) is on the tensor cores. */
    wgmma_wait<1>();
    fence_regs<KB / 2>(&s[0][0]);
    if (has_next) softmax(t + 1);
    wgmma_wait<0>();
    fence_regs<DP / 2>(&o[0][0]);
  }

  store_o<T, NO>(o, l, m, p, b, h, m0 + wr0, g, c);
#endif
}

/* Compiled with a 64-byte static shared array only where the sm_90a body above is
 * compiled, so cudaFuncGetAttributes tells whether this binary can run the kernel
 * on the current device (a build without sm_90a would JIT an empty body from PTX). */
__global__ void sm90_built_probe(int *never_written) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[16];
  if (never_written != nullptr && threadIdx.x == 1023) {
    marker[threadIdx.x & 15] = 1;
    __syncthreads();
    *never_written = marker[(threadIdx.x + 1) & 15];
  }
#endif
}

/* ----------------------------------------------------------- launcher -- */

template <typename T, int DP>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  constexpr size_t smem = sm90_smem(DP);
  constexpr int kWG = sm90_wg(DP);
  auto kernel = p->mask != nullptr ? attention_fwd_sm90<T, DP, sm90_kb(DP), kWG, true>
                                    : attention_fwd_sm90<T, DP, sm90_kb(DP), kWG, false>;
  static std::atomic<unsigned long long> raised[2];  /* unmasked, masked */
  cudaError_t e = raise_smem_once(kernel, smem, raised[p->mask != nullptr ? 1 : 0]);
  if (e != cudaSuccess) return cuda_fail(e);
  dim3 grid;
  if (!fold_grid((p->Sq + 64 * kWG - 1) / (64 * kWG), p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, 128 * kWG, smem, stream>>>(*p);
  e = cudaGetLastError();
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

/* ------------------------------------------------------------- family -- */

const char *sm90_unsupported(const dda_attention_params *p, const DevInfo &d) {
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) return dda_attn::kNeedsHalf;
  if (!d.sm90) return dda_attn::kNeedsSm90;
  if (padded_dim(p->D) == 0) return "takes head dims up to 256 only";
  if (!qkvo_aligned16(p)) return dda_attn::kNeedsAligned;
  return nullptr;
}

size_t sm90_smem_for(const dda_attention_params *p, const DevInfo &) { return sm90_smem(padded_dim(p->D)); }

long long sm90_head_blocks(const dda_attention_params *p, const DevInfo &) {
  const int rows = 64 * sm90_wg(padded_dim(p->D));
  return (p->Sq + rows - 1) / rows;
}

/* Measured on an H200 (benchmarks/NOTES.md): it beats mma for padded head dims 64..128
 * over long key sequences when its blocks fill the SMs (d64 @ 4096-9216 tokens, d128 @
 * 8192); mma wins for d40 (DP 48), for short key sequences (cross-attention, Sk <= 128)
 * and for small grids. */
bool sm90_preferred(const dda_attention_params *p, const DevInfo &d) {
  const int dp = padded_dim(p->D);
  if (dp < 64 || dp > 128 || p->Sk <= 128) return false;
  return folded_blocks(sm90_head_blocks(p, d), p) >= d.sms;
}

const char *sm90_kernel(const dda_attention_params *p, const DevInfo &) {
  struct Names {
    char s[2][kNumPaddedDims][48];
    Names() {
      for (int a = 0; a < 2; ++a)
        for (int i = 0; i < kNumPaddedDims; ++i)
          snprintf(s[a][i], sizeof s[a][i], "wgmma_sm90_dp%d_m%d_kb%d_%s", kPaddedDims[i],
                   64 * sm90_wg(kPaddedDims[i]), sm90_kb(kPaddedDims[i]), a == 0 ? "f16" : "bf16");
    }
  };
  static const Names names;
  return names.s[p->dtype == DDA_F16 ? 0 : 1][padded_index(padded_dim(p->D))];
}

dda_status sm90_launch(const dda_attention_params *p, const DevInfo &, cudaStream_t stream) {
  if (p->dtype == DDA_F16) return launch_dtype<__half>(p, stream);
  if (p->dtype == DDA_BF16) return launch_dtype<__nv_bfloat16>(p, stream);
  return DDA_ERR_UNSUPPORTED_DTYPE;
}

}  // namespace

const dda_attn::Family dda_attn::kSm90Family = {DDA_ATTN_SM90, sm90_unsupported, sm90_smem_for, sm90_head_blocks,
                                                sm90_preferred, sm90_kernel, sm90_launch};

/* Cached per device id < 64; no stream work, so safe during capture. */
int dda_attn::sm90_built() {
  static std::atomic<int> cache[64];  /* 0 unknown, 1 yes, 2 no */
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -1;
  if (dev >= 0 && dev < 64) {
    const int v = cache[dev].load(std::memory_order_acquire);
    if (v != 0) return v == 1 ? 1 : 0;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return -1;
  int ok = 0;
  if (major == 9) {
    cudaFuncAttributes a;
    if (cudaFuncGetAttributes(&a, sm90_built_probe) != cudaSuccess) return -1;
    ok = a.sharedSizeBytes >= 64 ? 1 : 0;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}
