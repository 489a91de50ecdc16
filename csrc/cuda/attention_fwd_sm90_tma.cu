/*
 * attention_fwd_sm90_tma.cu: flash-attention forward on Hopper with TMA loads and warp
 * specialisation (sm_90a only), fp16 and bf16, no mask. Head dims run at a padded width
 * DP: D 33..48 -> 48 (SD1.5's d40), 49..64 -> 64, 65..80 -> 80 (d80), 113..128 -> 128.
 * Layouts and arguments as attention_fwd_sm90.cu:
 *
 *   q    [B, Sq, H, D]  element strides q_stride_{b,s,h}; D contiguous
 *   k, v [B, Sk, H, D]  likewise (views of the packed [B, S, 3, H, D] / [B, Sk, 2, H, D])
 *   o    [B, Sq, H, D]  likewise
 *   lse  [B, H, Sq]     fp32 contiguous, or NULL
 *
 * One block = 1 producer warpgroup + NC consumer warpgroups x 64 query rows of one (b, h):
 *   DP <= 64: NC = 3 (192 rows, 512 threads), consumers 160 registers, producer 32
 *   DP 80, 128: NC = 2 (128 rows, 384 threads), consumers 240 registers, producer 24
 * (setmaxnreg moves the producer's registers to the consumers.) Keys per tile KB = 128.
 *
 * The producer (one thread) loads Q once and streams K/V tiles through 3 stages with
 * cp.async.bulk.tensor (TMA): each stage has a "full" mbarrier (the TMA transaction bytes
 * land) and an "empty" one (every consumer warp is done with it). Rows past Sq / Sk and
 * columns past D arrive as zeros (TMA out-of-bounds fill); the softmax masks keys >= Sk.
 *
 * Shared memory (1024-byte aligned regions), every tile in a wgmma swizzled layout as TMA
 * writes it. SW = the swizzle span: 128 bytes where DP is a multiple of 64, else 32 (so
 * DP 48 and 80 need no padding to 64). A tile of R rows x DP columns is DP / (SW / 2)
 * boxes, each R rows of SW bytes, 16-byte chunk j of row r stored at chunk j ^ (r % 8)
 * (SW = 128) or j ^ ((r / 4) % 2) (SW = 32); boxes one after the other.
 *   q_s  [boxes][ROWS][SW]            consumer w's rows at + w * 64 * SW in each box
 *   kv_s [3 stages][K, V][boxes][KB][SW]
 *   bars q_full, full[3], empty[3]
 * Descriptors (layout 1 = 128-byte swizzle, 3 = 32-byte):
 *   Q, K (K-major): SBO = 8 SW (next 8 rows); k-step of 16 columns = +32 bytes within a
 *                   box, or the next box
 *   V (B of O += P V, MN-major, imm-trans-b): SBO = 8 SW (next 8 keys), LBO = KB * SW
 *                   (next box of columns); k-step of 16 keys = +16 SW bytes
 *
 * Consumer pipeline: attention_fwd_sm90.cu's (FlashAttention-3's intra-warpgroup
 * overlap): per tile t, wait for tile t + 1, issue S' = Q K(t+1)^T, issue O += P V(t),
 * softmax of S' while P V(t) runs, then release stage t to the producer. The last tile
 * only adds its P V, except at DP 64 (see kPeel).
 */
#include <cuda.h>
#include <cudaTypedefs.h>
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

constexpr int kKB = 128;
/* Padded head dims compiled (D maps to the smallest >= D; see padded()). */
constexpr int kDims[] = {48, 64, 80, 128};
/* Consumer warpgroups: 3 (160 registers each) up to DP 64, else 2 (240 registers).
 * (2 at DP 48 / 64 measured 3-18% slower on the H200, also where it fills the last wave
 * of SMs better: benchmarks/NOTES.md, TMA kernel.) */
__host__ __device__ constexpr int tma_nc(int dp) { return dp <= 64 ? 3 : 2; }
/* Swizzle span in bytes: 128 where DP is a multiple of 64 (64-column boxes), else 32
 * (16-column boxes, so DP 48 and 80 load and multiply at their own width). */
__host__ __device__ constexpr int tma_sw(int dp) { return dp % 64 == 0 ? 128 : 32; }
__host__ __device__ constexpr int tma_stages(int) { return 3; }
__host__ __device__ constexpr size_t tma_smem(int dp, int nc) {
  /* + 1024 for aligning the base, + the barriers */
  return static_cast<size_t>(64 * nc + 2 * tma_stages(dp) * kKB) * dp * 2 + 1024 + 8 * (1 + 2 * 8);
}

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
/* Arrives once and adds `bytes` to the transactions the current phase waits for. */
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* Waits until the phase with this parity has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
/* One box of the 4-d tensor map to shared memory; completion counted on bar. */
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *map, int c0, int c1, int c2, int c3,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

#endif  // host pass or sm_90a

/* ------------------------------------------------------------- kernel -- */

/* hs: the tensor maps' dims are (d, h, s, b) when true, (d, s, h, b) when false. */
template <typename T, int DP, int NC, int NSTAGE, int SW>
__global__ void __launch_bounds__((NC + 1) * 128, 1)
attention_fwd_sm90_tma(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                       const __grid_constant__ CUtensorMap tm_v, const dda_attention_params p, const int hs) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int KB = kKB;
  constexpr int ROWS = NC * 64;
  constexpr int CB = SW / 2;                  /* columns per TMA box (one swizzle span) */
  constexpr int NH = DP / CB;                 /* boxes per row */
  constexpr uint32_t kLayout = SW == 128 ? 1 : 3;  /* descriptor layout: 128- or 32-byte swizzle */
  constexpr uint32_t kQBytes = ROWS * DP * 2;
  constexpr uint32_t kTile = KB * DP * 2;     /* one K or V tile */
  constexpr int NS = KB / 8;                  /* 8-key column tiles of S */
  constexpr int NO = DP / 8;                  /* 8-column tiles of O */

  extern __shared__ unsigned char smem_raw[];
  const uint32_t q_s = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t kv_s = q_s + kQBytes;                 /* stage i: K at kv_s + 2 i kTile, V after it */
  const uint32_t q_full = kv_s + NSTAGE * 2 * kTile;
  auto full = [&](int i) { return q_full + 8 + 8 * i; };
  auto empty = [&](int i) { return q_full + 8 + 8 * NSTAGE + 8 * i; };

  const int wg = threadIdx.x >> 7;
  const BlockCoords bc = block_coords(p);
  const int h = bc.h;
  const int b = bc.b;
  const int m0 = bc.tile * ROWS;
  const float scale_log2 = p.scale_log2;
  const int ntiles = (p.Sk + KB - 1) / KB;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
#pragma unroll
    for (int i = 0; i < NSTAGE; ++i) {
      mbar_init(full(i), 1);
      mbar_init(empty(i), NC * 4);  /* one arrival per consumer warp */
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    /* ---- producer ---- */
    setmaxnreg_dec<NC == 3 ? 32 : 24>();
    if (threadIdx.x == 0) {
      auto load = [&](uint32_t dst, const CUtensorMap *map, int d, int row, uint32_t bar) {
        if (hs) tma_load(dst, map, d, h, row, b, bar);
        else tma_load(dst, map, d, row, h, b, bar);
      };
      mbar_expect_tx(q_full, kQBytes);
#pragma unroll
      for (int hh = 0; hh < NH; ++hh) load(q_s + hh * ROWS * SW, &tm_q, hh * CB, m0, q_full);
      for (int t = 0; t < ntiles; ++t) {
        const int st = t % NSTAGE;
        if (t >= NSTAGE) mbar_wait(empty(st), ((t / NSTAGE) - 1) & 1);
        mbar_expect_tx(full(st), 2 * kTile);
        const uint32_t ks = kv_s + st * 2 * kTile;
#pragma unroll
        for (int hh = 0; hh < NH; ++hh) {
          load(ks + hh * KB * SW, &tm_k, hh * CB, t * KB, full(st));
          load(ks + kTile + hh * KB * SW, &tm_v, hh * CB, t * KB, full(st));
        }
      }
    }
    return;
  }

  /* ---- consumers ---- */
  setmaxnreg_inc<NC == 3 ? 160 : 240>();
  const int cw = wg - 1;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int wr0 = cw * 64 + warp * 16;  /* this warp's first row within the block */
  const int64_t mrow[2] = {0, 0};       /* no mask */

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  float alpha[2] = {0.0f, 0.0f};
  float s[NS][4];

  const uint64_t q_desc = make_desc(q_s + cw * 64 * SW, 16, 8 * SW, kLayout);
  auto issue_s = [&](int t) {
    const uint64_t k_desc = make_desc(kv_s + (t % NSTAGE) * 2 * kTile, 16, 8 * SW, kLayout);
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      const uint32_t col = (16 * ks) % CB * 2;  /* byte offset within the box */
      const uint32_t qo = (16 * ks / CB) * ROWS * SW + col, ko = (16 * ks / CB) * KB * SW + col;
      wgmma_ss<KB, T>(&s[0][0], q_desc + (qo >> 4), k_desc + (ko >> 4), ks);
    }
  };

  mbar_wait(q_full, 0);
  mbar_wait(full(0), 0);
  wgmma_fence();
  issue_s(0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs<KB / 2>(&s[0][0]);
  online_softmax<NS, false>(s, m, l, alpha, p, DDA_MASK_NONE, mrow, scale_log2, 0, c);

  /* O = O * alpha + P V of the tile in stage st (async; the caller commits and waits). */
  auto issue_pv = [&](const uint32_t (&pa)[NS / 2][4], int st) {
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
      o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
    const uint64_t v_desc = make_desc(kv_s + st * 2 * kTile + kTile, KB * SW, 8 * SW, kLayout);
    fence_regs<DP / 2>(&o[0][0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KB / 16; ++kk) wgmma_rs<DP, T>(&o[0][0], pa[kk], v_desc + kk * (16 * SW >> 4), 1);
  };

  /* kPeel: the loop stops before the last tile, which only adds its P V. Otherwise every
   * tile runs the loop body and the last one recomputes its own S (one loop body: measured
   * 3% faster at DP 64 on long key sequences, 1-7% slower at the other widths; see
   * benchmarks/NOTES.md, TMA kernel). */
  constexpr bool kPeel = DP != 64;
  for (int t = 0; t < (kPeel ? ntiles - 1 : ntiles); ++t) {
    const bool has_next = kPeel || t + 1 < ntiles;
    uint32_t pa[NS / 2][4];
    pack_p<T, NS>(pa, s);
    if (has_next) mbar_wait(full((t + 1) % NSTAGE), ((t + 1) / NSTAGE) & 1);
    /* S = Q K(t+1)^T, then O = O * alpha(t) + P(t) V(t) behind it */
    wgmma_fence();
    issue_s(has_next ? t + 1 : t);
    wgmma_commit();
    issue_pv(pa, t % NSTAGE);
    wgmma_commit();
    /* S landed; its softmax runs while P V(t) is on the tensor cores. */
    wgmma_wait<1>();
    fence_regs<KB / 2>(&s[0][0]);
    if (has_next) online_softmax<NS, false>(s, m, l, alpha, p, DDA_MASK_NONE, mrow, scale_log2, (t + 1) * KB, c);
    wgmma_wait<0>();
    fence_regs<DP / 2>(&o[0][0]);
    /* Stage t is done (S(t) and P V(t) have read it): one arrival per warp. */
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(t % NSTAGE));
  }
  if (kPeel) {  /* the last tile: P V only */
    uint32_t pa[NS / 2][4];
    pack_p<T, NS>(pa, s);
    issue_pv(pa, (ntiles - 1) % NSTAGE);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs<DP / 2>(&o[0][0]);
  }

  store_o<T, NO>(o, l, m, p, b, h, m0 + wr0, g, c);
#endif
}

/* ----------------------------------------------------------- launcher -- */

/* cuTensorMapEncodeTiled from the driver, looked up once (no link against libcuda). */
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void *f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

/* Tensor map over x[b, s, h, 0:D] (element strides sb, ss, sh) with boxes of
 * 64 columns x `rows` rows of one (b, h), 128-byte swizzle, zero fill out of bounds.
 * Dims (d, h, s, b) when hs, else (d, s, h, b). */
CUresult encode(CUtensorMap *map, dda_dtype dtype, const void *x, int D, int S, int H, int B, int64_t sb, int64_t ss,
                int64_t sh, int rows, int sw, bool hs) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(hs ? H : S),
                              static_cast<cuuint64_t>(hs ? S : H), static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>((hs ? sh : ss) * 2), static_cast<cuuint64_t>((hs ? ss : sh) * 2),
                                 static_cast<cuuint64_t>(sb * 2)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(sw / 2), hs ? 1u : static_cast<cuuint32_t>(rows), hs ? static_cast<cuuint32_t>(rows) : 1u, 1};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  return encode_fn()(map, dtype == DDA_F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4,
                     const_cast<void *>(x), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     sw == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_32B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

/* D 33..48 -> 48, 49..64 -> 64, 65..80 -> 80, 113..128 -> 128; 0: not taken (the
 * cp.async Hopper kernel or mma run those). */
int padded(int D) {
  if (D <= 32) return 0;
  for (int dp : kDims)
    if (D <= dp) return dp - D < 16 ? dp : 0;
  return 0;
}

/* A stride TMA accepts: a multiple of 16 bytes below 2^40 (size-1 dims: any stride
 * is replaced by a valid one by the caller, see strides_for). */
bool tma_stride_ok(int64_t s) { return s > 0 && (s * 2) % 16 == 0 && s * 2 < (1ll << 40); }

/* Strides with those of size-1 dims replaced (they are never stepped). */
void strides_for(int64_t *sb, int64_t *ss, int64_t *sh, int B, int S, int H, int D) {
  if (H == 1) *sh = D > 0 ? ((D + 7) / 8) * 8 : 8;
  if (S == 1) *ss = *sh * H;
  if (B == 1) *sb = *ss * S;
}

bool operand_ok(const void *x, int64_t sb, int64_t ss, int64_t sh, int B, int S, int H, int D) {
  strides_for(&sb, &ss, &sh, B, S, H, D);
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && tma_stride_ok(sb) && tma_stride_ok(ss) && tma_stride_ok(sh);
}

/* Blocks per (b, h): one per 64 * NC query rows. */
long long tiles_per_head(const dda_attention_params *p, int nc) { return (p->Sq + 64 * nc - 1) / (64 * nc); }

template <typename T, int DP>
dda_status launch(const dda_attention_params *p, cudaStream_t stream) {
  constexpr int NC = tma_nc(DP);
  constexpr int NSTAGE = tma_stages(DP);
  constexpr size_t smem = tma_smem(DP, NC);
  constexpr int SW = tma_sw(DP);
  auto kernel = attention_fwd_sm90_tma<T, DP, NC, NSTAGE, SW>;
  static std::atomic<unsigned long long> raised{0};
  cudaError_t e = raise_smem_once(kernel, smem, raised);
  if (e != cudaSuccess) return cuda_fail(e);
  if (encode_fn() == nullptr) return cuda_fail(cudaErrorNotSupported);  /* takes() said no */
  int64_t qb = p->q_stride_b, qs = p->q_stride_s, qh = p->q_stride_h;
  int64_t kb = p->k_stride_b, ks = p->k_stride_s, kh = p->k_stride_h;
  int64_t vb = p->v_stride_b, vs = p->v_stride_s, vh = p->v_stride_h;
  strides_for(&qb, &qs, &qh, p->B, p->Sq, p->H, p->D);
  strides_for(&kb, &ks, &kh, p->B, p->Sk, p->H, p->D);
  strides_for(&vb, &vs, &vh, p->B, p->Sk, p->H, p->D);
  /* (d, h, s, b) for the packed [B, S, n, H, D] layouts (h the smaller stride), else (d, s, h, b). */
  const bool hs = qh <= qs && kh <= ks && vh <= vs;
  CUtensorMap mq, mk, mv;
  CUresult r = encode(&mq, p->dtype, p->q, p->D, p->Sq, p->H, p->B, qb, qs, qh, 64 * NC, SW, hs);
  if (r == CUDA_SUCCESS) r = encode(&mk, p->dtype, p->k, p->D, p->Sk, p->H, p->B, kb, ks, kh, kKB, SW, hs);
  if (r == CUDA_SUCCESS) r = encode(&mv, p->dtype, p->v, p->D, p->Sk, p->H, p->B, vb, vs, vh, kKB, SW, hs);
  if (r != CUDA_SUCCESS) {  /* beyond the documented rules tma_unsupported checks: the driver's own refusal */
    dda_set_backend_error(static_cast<int>(r));
    return DDA_ERR_TENSOR_MAP;
  }
  dim3 grid;
  if (!fold_grid(tiles_per_head(p, NC), p, &grid)) return DDA_ERR_GRID_LIMIT;
  kernel<<<grid, 128 * (NC + 1), smem, stream>>>(mq, mk, mv, *p, hs ? 1 : 0);
  e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

/* ------------------------------------------------------------- family -- */

const char *tma_unsupported(const dda_attention_params *p, const dda_attn::DevInfo &d) {
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) return dda_attn::kNeedsHalf;
  if (!d.sm90) return dda_attn::kNeedsSm90;
  if (p->mask != nullptr) return "takes no mask";
  if (padded(p->D) == 0) return "takes head dims 33..80 and 113..128 only";
  if (!qkvo_aligned16(p)) return dda_attn::kNeedsAligned;
  if (!(operand_ok(p->q, p->q_stride_b, p->q_stride_s, p->q_stride_h, p->B, p->Sq, p->H, p->D) &&
        operand_ok(p->k, p->k_stride_b, p->k_stride_s, p->k_stride_h, p->B, p->Sk, p->H, p->D) &&
        operand_ok(p->v, p->v_stride_b, p->v_stride_s, p->v_stride_h, p->B, p->Sk, p->H, p->D)))
    return "needs q, k and v strides that a TMA tensor map accepts (positive, below 2^39 elements)";
  if (encode_fn() == nullptr) return "needs a driver with cuTensorMapEncodeTiled (CUDA 12.0 or newer)";
  return nullptr;
}

/* The largest block it may launch for the head dim. */
size_t tma_smem_for(const dda_attention_params *p, const dda_attn::DevInfo &) {
  const int dp = padded(p->D);
  return tma_smem(dp, tma_nc(dp));
}

long long tma_head_blocks(const dda_attention_params *p, const dda_attn::DevInfo &) {
  return tiles_per_head(p, tma_nc(padded(p->D)));
}

/* Measured on an H200 (benchmarks/NOTES.md): it beats mma 1.4-2x on every self-attention
 * shape of SD1.5, SD2.1 and SDXL and loses for Sk <= 128 (cross-attention, Sk = 77: one
 * partial key tile, where mma's smaller blocks fill the SMs). */
bool tma_preferred(const dda_attention_params *p, const dda_attn::DevInfo &) { return p->Sk > 128; }

const char *tma_kernel(const dda_attention_params *p, const dda_attn::DevInfo &) {
  struct Names {
    char s[2][4][48];  /* [dtype][dim] */
    Names() {
      for (int a = 0; a < 2; ++a)
        for (int i = 0; i < 4; ++i)
          snprintf(s[a][i], sizeof s[a][i], "tma_ws_sm90_dp%d_m%d_kb%d_sw%d_%s", kDims[i], 64 * tma_nc(kDims[i]), kKB,
                   tma_sw(kDims[i]), a == 0 ? "f16" : "bf16");
    }
  };
  static const Names names;
  const int dp = padded(p->D);
  int i = 0;
  while (kDims[i] != dp) ++i;
  return names.s[p->dtype == DDA_F16 ? 0 : 1][i];
}

dda_status tma_launch(const dda_attention_params *p, const dda_attn::DevInfo &, cudaStream_t stream) {
  const bool f16 = p->dtype == DDA_F16;
  switch (padded(p->D)) {
    case 48: return f16 ? launch<__half, 48>(p, stream) : launch<__nv_bfloat16, 48>(p, stream);
    case 64: return f16 ? launch<__half, 64>(p, stream) : launch<__nv_bfloat16, 64>(p, stream);
    case 80: return f16 ? launch<__half, 80>(p, stream) : launch<__nv_bfloat16, 80>(p, stream);
    case 128: return f16 ? launch<__half, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
    default: return DDA_ERR_UNSUPPORTED_HEAD_DIM;
  }
}

}  // namespace

const dda_attn::Family dda_attn::kSm90TmaFamily = {DDA_ATTN_SM90_TMA, tma_unsupported, tma_smem_for,
                                                   tma_head_blocks, tma_preferred, tma_kernel, tma_launch};
