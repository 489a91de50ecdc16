// low_rank.cu: the B side of LoRA for all adapters of one input, one launch (dda.h, "low rank").
//
//   out[m, col0 + j] += alpha * sum over the target's segments s of f_s * (t[m, r0_s : r1_s] . b_s[j, :])
//   t   [M, R] (row stride t_stride), f16 / bf16
//   b_s [n, r_s] contiguous (each adapter's own PEFT weight), f_s = factors[r0_s] (fp32, device)
//   out [M, N] (row stride out_stride), in place
//
// Why one kernel: per adapter and per projection the library way is one GEMM accumulating into
// the fused output (beta = 1), each re-reading and re-writing its columns; the adapters' B
// matrices are separate tensors, so no single library GEMM covers them. Here every output tile
// is read once, gets the fp32 sum of all its segments, and is written once. The work is a
// read-modify-write of out (the ranks are small), so the time is memory traffic and latency.
//
// Tiles: kBM x kBN = 64 x 128 outputs per block step, 4 warps in 2 x 2, each warp 32 x 64 (2 x 8
// mma tiles of m16n8k16, fp32 accumulators). Column tiles are laid over the targets (distinct
// (col0, n)) and never span two; the host lists each target's segments. Per tile: the segments
// whose factor is not 0 run their k-steps (ldmatrix + mma.sync); at a segment's end
// acc += f * part (the segment's own fp32 partial, so the factor is applied in fp32 and never
// rounded into t; with one segment per target (MULTI = false) the factor is applied at the end);
// then out tile + alpha * acc is rounded once in shared memory and stored with 16-byte stores.
// A target whose factors are all 0 writes nothing.
//
// Two kernels, one choice (build):
//   resident: where every 16-byte path holds and a target's ranks (each rounded up to 16) total at
//     most kResRanks. A block owns one column tile and a run of row tiles: its b columns for
//     every segment are loaded once and stay in shared memory. Where all tiles fit on the GPU
//     at once, each is its own block (one stage); else the grid fills the GPU once (occupancy x
//     SMs), each block an equal run of row tiles streamed through two cp.async stages (out tile
//     + the target's t columns; one stage where the device's shared memory per block is too
//     small for two), so the next tile's reads are in flight while one computes and stores. On
//     sm_90 it is launched with programmatic stream serialization: a block's set-up overlaps
//     the end of the previous kernel, and it reads global memory only after that kernel is done.
//   general: everything else (any rank, any alignment). One block per (row tile, column tile):
//     it copies the out tile, then walks the chunks (kKC ranks of one segment: t[64 x kKC] and
//     b[128 x kKC]) double-buffered. t or b chunks are copied element by element where the
//     16-byte path does not hold (pointer not 16-byte aligned, t's row stride or r0 not a
//     multiple of 8, r not a multiple of 8); the out tile is read and written element by element
//     where out, its row stride, col0 or n is not a multiple of 8 elements / 16 bytes.
// Ranks from r to the next multiple of 16 are zeros in shared memory (t and b alike).
//
// CUDA graphs: segments, pointers and alpha are kernel arguments (captured); the factors are
// read from device memory at run time, so a replay after an in-place factor update uses the new
// values, and skipping a segment with factor 0 is decided per replay.
//
// DDA_LOW_RANK_GENERAL_ONLY (a build flag): run the general kernel for everything, so that the
// harness can time the two against each other.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "dda.h"
#include "dtype_convert.cuh"
#include "launch_common.cuh"
#include "mma_common.cuh"

namespace {

constexpr int kBM = 64;        // output rows per tile
constexpr int kBN = 128;       // output columns per tile
constexpr int kThreads = 128;  // 4 warps
constexpr int kLdO = kBN + 8;  // row stride of a staged out tile (conflict-free fragment access)
constexpr int kOutTile = kBM * kLdO;  // elements
constexpr int kMaxSeg = DDA_LOW_RANK_MAX_SEGMENTS;
// Row strides of staged t and b are (ranks + 8) elements, ranks a multiple of 16: an odd
// multiple of 16 bytes, so the 8 rows of an ldmatrix 8x8 fall in distinct bank groups.

// general kernel
constexpr int kKC = 64;        // ranks per staged chunk
constexpr int kLdK = kKC + 8;
constexpr int kStageT = kBM * kLdK;
constexpr int kStage = kStageT + kBN * kLdK;
constexpr size_t kGeneralSmem = static_cast<size_t>(2 * kStage + kOutTile) * 2;  // 72,704 bytes

// resident kernel
constexpr int kResRanks = 128;  // a target's ranks (each rounded up to 16) that stay resident
constexpr int kResChunks = kResRanks / 8;  // 16-byte pieces of one row of a target's t columns
constexpr int kMaxStages = 2;
size_t resident_smem(int ld, int stages) {  // bytes: stages x (out tile + t tile), then b
  return static_cast<size_t>(stages * (kOutTile + kBM * ld) + kBN * ld) * 2;
}

struct KSeg {
  const uint16_t *b;
  int r0, r;
  int vec_t, vec_b;  // 16-byte copies of t's and b's chunks hold
  int koff;          // resident kernel: its first rank's column in the staged t and b
};

struct KTarget {
  int64_t col0;
  int n;
  int tile_begin;          // its first column tile in the grid's column-tile index
  int seg_begin, seg_end;  // its segments in KParams::segs
  int vec_out;             // 16-byte copies of its out tiles hold
  int chunks;              // resident kernel: 16-byte pieces per row of its t columns
};

struct KParams {
  const uint16_t *t;
  uint16_t *out;
  const float *factors;
  int64_t t_stride, out_stride, M;
  float alpha;
  int num_targets, col_tiles;
  int ld;                   // resident kernel: row stride (elements) of staged t and b
  int64_t tiles_per_block;  // resident kernel: row tiles per run (run r = blockIdx.x / col_tiles: tiles r*tpb ..)
  int stages;               // resident kernel: 1 (one tile per block) or kMaxStages
  KTarget targets[kMaxSeg];
  KSeg segs[kMaxSeg];  // grouped by target, in the caller's order within a target
};

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&u));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
  }
}

/* ---------------------------------------------------------- shared pieces -- */

using Frag = float[2][8][4];  // one warp's 32 x 64 accumulators

/* f(i, j, e) for every accumulator of a warp tile (unrolled). */
template <typename F>
__device__ __forceinline__ void frag_each(F f) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(i, j, e);
}

__device__ __forceinline__ void frag_zero(Frag &a) {
  frag_each([&](int i, int j, int e) { a[i][j][e] = 0.0f; });
}

/* acc += f * part; part = 0 */
__device__ __forceinline__ void frag_axpy_clear(Frag &acc, float f, Frag &part) {
  frag_each([&](int i, int j, int e) {
    acc[i][j][e] += f * part[i][j][e];
    part[i][j][e] = 0.0f;
  });
}

__device__ __forceinline__ void frag_scale(Frag &acc, float f) {
  frag_each([&](int i, int j, int e) { acc[i][j][e] *= f; });
}

/* part += t[warp rows] . b[warp cols]^T over ksteps (<= kMax) k-steps of 16, both row-major in
 * shared memory with row stride ld elements. a: this lane's ldmatrix address in t (m-tile 0),
 * bb: in b (n-tile 0); see mma_common.cuh's qk_mma for the fragment layouts. */
template <typename T, int kMax>
__device__ __forceinline__ void frag_mma(Frag &part, uint32_t a, uint32_t bb, int ld, int ksteps) {
  const uint32_t tile16 = 16u * ld * 2;  // bytes of 16 rows
#pragma unroll
  for (int ks = 0; ks < kMax; ++ks) {
    if (ks < ksteps) {
      uint32_t af[2][4];
      ldsm_x4(af[0], a + ks * 32);
      ldsm_x4(af[1], a + tile16 + ks * 32);
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        uint32_t bf[4];
        ldsm_x4(bf, bb + jp * tile16 + ks * 32);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma16816<T>(part[i][2 * jp], af[i], bf[0], bf[1]);
          mma16816<T>(part[i][2 * jp + 1], af[i], bf[2], bf[3]);
        }
      }
    }
  }
}

/* This lane's ldmatrix offsets (bytes) in a staged t (rows = m, cols = k) and b (rows = n,
 * cols = k), row stride ld elements; warp (wm, wn) owns rows wm*32.. and columns wn*64.. */
__device__ __forceinline__ uint32_t t_lane_offset(int wm, int lane, int ld) {
  return ((wm * 32 + (lane & 15)) * ld + 8 * (lane >> 4)) * 2;
}
__device__ __forceinline__ uint32_t b_lane_offset(int wn, int lane, int ld) {
  return ((wn * 64 + (lane & 7) + 8 * (lane >> 4)) * ld + 8 * ((lane >> 3) & 1)) * 2;
}

/* cp.async of an out tile (nrows x ncols, ncols a multiple of 8; zeros elsewhere). */
__device__ __forceinline__ void copy_out_tile(uint16_t *otile, const uint16_t *out, int64_t stride, int nrows,
                                              int ncols, int tid) {
#pragma unroll
  for (int it = 0; it < kBM * (kBN / 8) / kThreads; ++it) {
    const int c = tid + it * kThreads, i = c / (kBN / 8), d = (c % (kBN / 8)) * 8;
    const bool ok = i < nrows && d < ncols;
    cp_async16(otile + i * kLdO + d, ok ? out + i * stride + d : out, ok ? 16 : 0);
  }
}

/* otile += alpha * acc, rounded once. Accumulator element e of tile (i, j) sits at row
 * wm*32 + 16 i + g + 8 (e / 2), column wn*64 + 8 j + 2 c + e % 2. */
template <typename T>
__device__ __forceinline__ void add_into_tile(uint16_t *otile, const Frag &acc, float alpha, int wm, int wn,
                                              int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t *q = reinterpret_cast<uint32_t *>(otile + (wm * 32 + 16 * i + g + 8 * h) * kLdO + wn * 64 + 8 * j + 2 * c);
        const float2 o = unpack2<T>(*q);
        *q = pack2<T>(o.x + alpha * acc[i][j][2 * h], o.y + alpha * acc[i][j][2 * h + 1]);
      }
}

/* 16-byte stores of an out tile's nrows x ncols (ncols a multiple of 8). */
__device__ __forceinline__ void store_out_tile(uint16_t *out, int64_t stride, const uint16_t *otile, int nrows,
                                               int ncols, int tid) {
#pragma unroll
  for (int it = 0; it < kBM * (kBN / 8) / kThreads; ++it) {
    const int c = tid + it * kThreads, i = c / (kBN / 8), d = (c % (kBN / 8)) * 8;
    if (i < nrows && d < ncols)
      *reinterpret_cast<uint4 *>(out + i * stride + d) = *reinterpret_cast<const uint4 *>(otile + i * kLdO + d);
  }
}

/* The column tile ct's target. */
__device__ __forceinline__ int target_of(const KParams &p, int ct) {
  int ti = 0;
  while (ti + 1 < p.num_targets && ct >= p.targets[ti + 1].tile_begin) ++ti;
  return ti;
}

/* fac[s - seg_begin] = the factor of segment s (for tid < the target's segments); call before a
 * __syncthreads. */
__device__ __forceinline__ void load_factors(float *fac, const KParams &p, const KTarget &tg, int tid) {
  if (tid < tg.seg_end - tg.seg_begin) fac[tid] = p.factors[p.segs[tg.seg_begin + tid].r0];
}

__device__ __forceinline__ bool any_factor(const float *fac, int nseg) {
  bool any = false;
  for (int s = 0; s < nseg; ++s) any = any || fac[s] != 0.0f;
  return any;
}

/* -------------------------------------------------------- resident kernel -- */

/* Waits until the grid launched before this one on the stream has completed and its writes are
 * visible (griddepcontrol.wait; a no-op when the launch had no programmatic dependency). */
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <typename T, bool MULTI>
__global__ void __launch_bounds__(kThreads, 3) low_rank_resident_kernel(const __grid_constant__ KParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  __shared__ float fac[kMaxSeg];
  __shared__ int16_t piece_seg[kResChunks], piece_src[kResChunks], piece_dst[kResChunks];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int ld = p.ld;
  const int stage_elems = kOutTile + kBM * ld;
  const int stages = p.stages;
  uint16_t *sb = smem + stages * stage_elems;  // b: kBN rows x ld

  const int ct = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.col_tiles));
  const int64_t first_tile = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(p.col_tiles)) * p.tiles_per_block;
  const int64_t m_tiles = (p.M + kBM - 1) / kBM;
  const int ntiles = static_cast<int>(min(p.tiles_per_block, m_tiles - first_tile));
  const KTarget &tg = p.targets[target_of(p, ct)];
  const int colt = (ct - tg.tile_begin) * kBN, ncols = min(kBN, tg.n - colt);
  const int pieces = tg.chunks;

  // Where each 16-byte piece of a t row (and of a b row) comes from and goes: segment, rank
  // within it, column in shared memory. Then zeros in the padding ranks of every stage and b.
  if (tid < pieces) {
    int c = tid, s = tg.seg_begin;
    while (c >= p.segs[s].r / 8) c -= p.segs[s++].r / 8;
    piece_seg[tid] = static_cast<int16_t>(s);
    piece_src[tid] = static_cast<int16_t>(8 * c);
    piece_dst[tid] = static_cast<int16_t>(p.segs[s].koff + 8 * c);
  }
  for (int s = tg.seg_begin; s < tg.seg_end; ++s) {
    const KSeg &sg = p.segs[s];
    if (sg.r % 16 == 0) continue;
    const int col = sg.koff + sg.r;  // 8 zero ranks
    for (int row = tid; row < stages * kBM + kBN; row += kThreads) {
      uint16_t *dst = row < stages * kBM ? smem + (row / kBM) * stage_elems + kOutTile + (row % kBM) * ld
                                         : sb + (row - stages * kBM) * ld;
      *reinterpret_cast<uint4 *>(dst + col) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  __syncthreads();
  // With programmatic stream serialization (launch_resident, sm_90 images) everything above may
  // run while the previous kernel on the stream finishes; nothing is read from global memory
  // before it is done.
  wait_for_previous_grid();

  // b for this column tile, every segment, once.
  for (int c = tid; c < kBN * pieces; c += kThreads) {
    const int j = c / pieces, q = c % pieces;
    const KSeg &sg = p.segs[piece_seg[q]];
    const bool ok = j < ncols;
    const uint16_t *src = sg.b + static_cast<int64_t>(colt + j) * sg.r + piece_src[q];
    cp_async16(sb + j * ld + piece_dst[q], ok ? src : sg.b, ok ? 16 : 0);
  }
  uint16_t *out0 = p.out + tg.col0 + colt;
  auto load_tile = [&](int i) {  // row tile first_tile + i into stage i % stages
    uint16_t *st = smem + (i % stages) * stage_elems;
    const int64_t row0 = (first_tile + i) * kBM;
    const int nrows = static_cast<int>(min(static_cast<int64_t>(kBM), p.M - row0));
    copy_out_tile(st, out0 + row0 * p.out_stride, p.out_stride, nrows, ncols, tid);
    const uint16_t *t = p.t + row0 * p.t_stride;
    for (int c = tid; c < kBM * pieces; c += kThreads) {
      const int r = c / pieces, q = c % pieces;
      const bool ok = r < nrows;
      const uint16_t *src = t + r * p.t_stride + p.segs[piece_seg[q]].r0 + piece_src[q];
      cp_async16(st + kOutTile + r * ld + piece_dst[q], ok ? src : p.t, ok ? 16 : 0);
    }
  };
  for (int i = 0; i < stages - 1; ++i) {
    if (i < ntiles) load_tile(i);
    cp_async_commit();  // group i (group 0 also holds b); empty past the last tile
  }
  load_factors(fac, p, tg, tid);
  __syncthreads();
  if (!any_factor(fac, tg.seg_end - tg.seg_begin)) {  // every factor 0: out untouched
    cp_async_commit();  // (with one stage, b's copies are not in a group yet)
    cp_async_wait_all();
    return;
  }

  const uint32_t base = smem_u32(smem);
  const uint32_t a_off = t_lane_offset(wm, lane, ld), b_at = smem_u32(sb) + b_lane_offset(wn, lane, ld);
  Frag acc, part;
  Frag &pt = MULTI ? part : acc;
  for (int i = 0; i < ntiles; ++i) {
    if (i + stages - 1 < ntiles) load_tile(i + stages - 1);
    cp_async_commit();
    if (stages == 1) cp_async_wait<0>();  // tile i (and b) landed
    else cp_async_wait<kMaxStages - 1>();
    __syncthreads();
    uint16_t *st = smem + (i % stages) * stage_elems;
    const uint32_t t_at = base + static_cast<uint32_t>((i % stages) * stage_elems + kOutTile) * 2 + a_off;
    frag_zero(acc);
    if (MULTI) frag_zero(part);
    float single_f = 0.0f;
    for (int s = tg.seg_begin; s < tg.seg_end; ++s) {
      const float f = fac[s - tg.seg_begin];
      if (f == 0.0f) continue;
      const KSeg &sg = p.segs[s];
      frag_mma<T, kResRanks / 16>(pt, t_at + sg.koff * 2, b_at + sg.koff * 2, ld, (sg.r + 15) >> 4);
      if (MULTI) frag_axpy_clear(acc, f, part);
      else single_f = f;
    }
    if (!MULTI) frag_scale(acc, single_f);
    add_into_tile<T>(st, acc, p.alpha, wm, wn, lane);
    __syncthreads();
    const int64_t row0 = (first_tile + i) * kBM;
    store_out_tile(out0 + row0 * p.out_stride, p.out_stride, st,
                   static_cast<int>(min(static_cast<int64_t>(kBM), p.M - row0)), ncols, tid);
    __syncthreads();  // every thread is done with this stage before a copy refills it
  }
}

/* --------------------------------------------------------- general kernel -- */

/* Stages ranks [k0, k0 + w) of segment sg (zero beyond w up to the next multiple of 16, and
 * for rows past nrows / b rows past ncols) into one stage: t rows row0.., b rows bcol0.. */
__device__ __forceinline__ void load_chunk(uint16_t *stage, const KParams &p, const KSeg &sg, int64_t row0,
                                           int nrows, int bcol0, int ncols, int k0, int tid) {
  const int w = min(kKC, sg.r - k0);
  const int wp = (w + 15) & ~15;
  const uint16_t *t = p.t + row0 * p.t_stride + sg.r0 + k0;
  const uint16_t *b = sg.b + static_cast<int64_t>(bcol0) * sg.r + k0;
  uint16_t *st = stage, *sb = stage + kStageT;
  if (sg.vec_t) {
#pragma unroll
    for (int it = 0; it < kBM * (kKC / 8) / kThreads; ++it) {
      const int c = tid + it * kThreads, i = c / (kKC / 8), d = (c % (kKC / 8)) * 8;
      if (d < wp) {
        const bool ok = i < nrows && d < w;
        cp_async16(st + i * kLdK + d, ok ? t + i * p.t_stride + d : t, ok ? 16 : 0);
      }
    }
  } else {
    for (int e = tid; e < kBM * kKC; e += kThreads) {
      const int i = e / kKC, d = e % kKC;
      if (d < wp) st[i * kLdK + d] = i < nrows && d < w ? t[i * p.t_stride + d] : uint16_t(0);
    }
  }
  if (sg.vec_b) {
#pragma unroll
    for (int it = 0; it < kBN * (kKC / 8) / kThreads; ++it) {
      const int c = tid + it * kThreads, j = c / (kKC / 8), d = (c % (kKC / 8)) * 8;
      if (d < wp) {
        const bool ok = j < ncols && d < w;
        cp_async16(sb + j * kLdK + d, ok ? b + static_cast<int64_t>(j) * sg.r + d : b, ok ? 16 : 0);
      }
    }
  } else {
    for (int e = tid; e < kBN * kKC; e += kThreads) {
      const int j = e / kKC, d = e % kKC;
      if (d < wp) sb[j * kLdK + d] = j < ncols && d < w ? b[static_cast<int64_t>(j) * sg.r + d] : uint16_t(0);
    }
  }
}

template <typename T, bool MULTI>
__global__ void __launch_bounds__(kThreads, 3) low_rank_general_kernel(const __grid_constant__ KParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  __shared__ float fac[kMaxSeg];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  // This block's tile: column tile fastest, so the blocks that run together read the same rows
  // of t (from L2 after the first).
  const int ct = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.col_tiles));
  const unsigned mt = blockIdx.x / static_cast<unsigned>(p.col_tiles);
  const KTarget &tg = p.targets[target_of(p, ct)];
  const int64_t row0 = static_cast<int64_t>(mt) * kBM;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kBM), p.M - row0));
  const int colt = (ct - tg.tile_begin) * kBN;  // within the target
  const int ncols = min(kBN, tg.n - colt);
  const int seg_begin = tg.seg_begin, seg_end = tg.seg_end;
  uint16_t *out = p.out + row0 * p.out_stride + tg.col0 + colt;
  uint16_t *otile = smem + 2 * kStage;
  const bool vec_out = tg.vec_out != 0;

  // The out tile streams in while the rest runs; chunk 0 of the first segment is copied
  // speculatively (its factor is not known yet), the factors read while those copies fly.
  if (vec_out) copy_out_tile(otile, out, p.out_stride, nrows, ncols, tid);
  cp_async_commit();
  load_chunk(smem, p, p.segs[seg_begin], row0, nrows, colt, ncols, 0, tid);
  cp_async_commit();
  load_factors(fac, p, tg, tid);
  __syncthreads();
  if (!any_factor(fac, seg_end - seg_begin)) {  // every factor 0: out untouched
    cp_async_wait_all();
    return;
  }

  const uint32_t base = smem_u32(smem);
  const uint32_t a_off = t_lane_offset(wm, lane, kLdK), b_off = kStageT * 2 + b_lane_offset(wn, lane, kLdK);
  Frag acc, part;
  Frag &pt = MULTI ? part : acc;
  frag_zero(acc);
  if (MULTI) frag_zero(part);
  float single_f = 0.0f;

  // Chunks of the segments whose factor is not 0, double-buffered: the next chunk's copy is in
  // flight while this one's k-steps run.
  int s = seg_begin, k0 = 0, stage = 0;
  while (s < seg_end) {
    const bool active = fac[s - seg_begin] != 0.0f;
    const int r = p.segs[s].r;
    // The next chunk: the next kKC ranks of this segment, else the first of the next active one.
    int ns = s, nk0 = k0 + kKC;
    if (!active || nk0 >= r) {
      nk0 = 0;
      do ++ns; while (ns < seg_end && fac[ns - seg_begin] == 0.0f);
    }
    if (ns < seg_end) load_chunk(smem + (stage ^ 1) * kStage, p, p.segs[ns], row0, nrows, colt, ncols, nk0, tid);
    cp_async_commit();
    cp_async_wait_one();  // this chunk (and the out tile) landed
    __syncthreads();
    if (active) {
      const uint32_t st = base + static_cast<uint32_t>(stage * kStage * 2);
      frag_mma<T, kKC / 16>(pt, st + a_off, st + b_off, kLdK, (min(kKC, r - k0) + 15) >> 4);
      if (k0 + kKC >= r) {  // the segment's last chunk
        const float f = fac[s - seg_begin];
        if (MULTI) frag_axpy_clear(acc, f, part);
        else single_f = f;
      }
    }
    __syncthreads();  // every warp is done with this stage before the next copy into it
    s = ns;
    k0 = nk0;
    stage ^= 1;
  }
  if (!MULTI) frag_scale(acc, single_f);

  if (vec_out) {
    add_into_tile<T>(otile, acc, p.alpha, wm, wn, lane);
    __syncthreads();
    store_out_tile(out, p.out_stride, otile, nrows, ncols, tid);
  } else {
    const int g = lane >> 2, c = lane & 3;
    T *o = reinterpret_cast<T *>(out);
    frag_each([&](int i, int j, int e) {
      const int row = wm * 32 + 16 * i + g + 8 * (e >> 1), col = wn * 64 + 8 * j + 2 * c + (e & 1);
      if (row < nrows && col < ncols) {
        T *q = o + row * p.out_stride + col;
        *q = from_f32<T>(to_f32(*q) + p.alpha * acc[i][j][e]);
      }
    });
  }
}

/* -------------------------------------------------------------- launchers -- */

/* Blocks of one launch at most (the gridDim.x limit). */
constexpr int64_t kMaxBlocks = 2147483647LL;

/* The kernel's arguments from p (checked): targets in order of first appearance, their segments
 * grouped, the 16-byte flags, the resident layout; multi: some target has more than one
 * segment; resident: the resident kernel runs it; blocks: the general kernel's grid (saturated
 * at kMaxBlocks + 1; the resident grid is never larger). */
void build(const dda_low_rank_params *p, KParams *kp, bool *multi, bool *resident, int64_t *blocks) {
  *kp = KParams{};
  kp->t = static_cast<const uint16_t *>(p->t);
  kp->out = static_cast<uint16_t *>(p->out);
  kp->factors = p->factors;
  kp->t_stride = p->t_stride;
  kp->out_stride = p->out_stride;
  kp->M = p->M;
  kp->alpha = p->alpha;
  const bool t_al = reinterpret_cast<uintptr_t>(p->t) % 16 == 0 && p->t_stride % 8 == 0;
  const bool out_al = reinterpret_cast<uintptr_t>(p->out) % 16 == 0 && p->out_stride % 8 == 0;
  bool done[kMaxSeg] = {};
  int nseg = 0, ntg = 0, tiles = 0, widest = 0;
  *multi = false;
#ifdef DDA_LOW_RANK_GENERAL_ONLY
  *resident = false;
#else
  *resident = true;
#endif
  for (int s = 0; s < p->num_segments; ++s) {
    if (done[s]) continue;
    const dda_low_rank_segment &first = p->segments[s];
    KTarget &tg = kp->targets[ntg++];
    tg.col0 = first.col0;
    tg.n = static_cast<int>(first.n);
    tg.tile_begin = tiles;
    tg.seg_begin = nseg;
    tg.vec_out = out_al && first.col0 % 8 == 0 && first.n % 8 == 0;
    *resident = *resident && tg.vec_out;
    tiles += static_cast<int>((first.n + kBN - 1) / kBN);
    int64_t koff = 0;  // ranks of the target so far, each rounded up to 16
    for (int u = s; u < p->num_segments; ++u) {
      const dda_low_rank_segment &sg = p->segments[u];
      if (sg.col0 != first.col0 || sg.n != first.n) continue;
      done[u] = true;
      KSeg &k = kp->segs[nseg++];
      k.b = static_cast<const uint16_t *>(sg.b);
      k.r0 = static_cast<int>(sg.r0);
      k.r = static_cast<int>(sg.r1 - sg.r0);
      k.vec_t = t_al && k.r0 % 8 == 0 && k.r % 8 == 0;
      k.vec_b = reinterpret_cast<uintptr_t>(sg.b) % 16 == 0 && k.r % 8 == 0;
      *resident = *resident && k.vec_t && k.vec_b;
      // koff and chunks are read only when the target fits (koff <= kResRanks at the end)
      k.koff = static_cast<int>(koff < kResRanks ? koff : kResRanks);
      koff += (sg.r1 - sg.r0 + 15) / 16 * 16;
      tg.chunks += static_cast<int>(koff <= kResRanks ? k.r / 8 : 0);
    }
    tg.seg_end = nseg;
    *resident = *resident && koff <= kResRanks;
    widest = koff <= kResRanks && koff > widest ? static_cast<int>(koff) : widest;
    *multi = *multi || tg.seg_end - tg.seg_begin > 1;
  }
  kp->num_targets = ntg;
  kp->col_tiles = tiles;
  kp->ld = widest + 8;
  const int64_t m_tiles = (p->M + kBM - 1) / kBM;
  *blocks = m_tiles > kMaxBlocks / tiles ? kMaxBlocks + 1 : m_tiles * tiles;
}

template <typename T, bool MULTI>
dda_status launch_general(const KParams &kp, int64_t blocks, cudaStream_t stream) {
  static std::atomic<unsigned long long> raised{0};
  cudaError_t e = raise_smem_once(low_rank_general_kernel<T, MULTI>, kGeneralSmem, raised);
  if (e != cudaSuccess) return cuda_fail(e);
  low_rank_general_kernel<T, MULTI><<<static_cast<unsigned>(blocks), kThreads, kGeneralSmem, stream>>>(kp);
  e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

/* The resident grid: col_tiles x (row-tile runs). Where every tile fits on the GPU at once as
 * its own block with one stage (resident blocks per SM x SMs), that; else equal runs of row
 * tiles, at most as many blocks as fit at once, streamed through two stages where the
 * device's shared memory per block allows them (through one otherwise: 99 KB devices at 128
 * ranks a target). */
template <typename T, bool MULTI>
dda_status launch_resident(KParams kp, cudaStream_t stream) {
  auto kernel = low_rank_resident_kernel<T, MULTI>;
  int dev = 0, sms = 0, optin = 0, per_sm = 0;
  cudaFuncAttributes fa = {};
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&fa, kernel);
  if (e != cudaSuccess) return cuda_fail(e);
  // the dynamic limit: two stages of the widest layout, or what the device gives a block
  const size_t widest = resident_smem(kResRanks + 8, kMaxStages);
  const size_t device_max = static_cast<size_t>(optin) - fa.sharedSizeBytes;
  const size_t limit = widest < device_max ? widest : device_max;
  static std::atomic<unsigned long long> raised{0};
  e = raise_smem_once(kernel, limit, raised);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, resident_smem(kp.ld, 1));
  if (e != cudaSuccess) return cuda_fail(e);
  const int64_t m_tiles = (kp.M + kBM - 1) / kBM;
  int64_t runs = m_tiles;
  kp.stages = 1;
  kp.tiles_per_block = 1;
  if (m_tiles * kp.col_tiles > static_cast<int64_t>(sms) * per_sm) {
    if (resident_smem(kp.ld, kMaxStages) <= limit) {
      kp.stages = kMaxStages;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, resident_smem(kp.ld, kMaxStages));
      if (e != cudaSuccess) return cuda_fail(e);
    }
    const int64_t slots = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    runs = slots / kp.col_tiles;  // rounded down: the blocks fit at once
    runs = runs < 1 ? 1 : runs < m_tiles ? runs : m_tiles;
    kp.tiles_per_block = (m_tiles + runs - 1) / runs;
    runs = (m_tiles + kp.tiles_per_block - 1) / kp.tiles_per_block;
  }
  // Programmatic stream serialization: the blocks may be scheduled, and run their prologue up
  // to wait_for_previous_grid, while the previous kernel (the A-side GEMM) drains. Only for a
  // kernel image compiled for sm_90 on (an older one, JIT-compiled from compute_80 PTX, has no
  // wait in it).
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(runs * kp.col_tiles));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = resident_smem(kp.ld, kp.stages);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = fa.ptxVersion >= 90 ? 1 : 0;
  e = cudaLaunchKernelEx(&cfg, kernel, kp);
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

template <typename T, bool MULTI>
dda_status launch(const KParams &kp, bool resident, int64_t blocks, cudaStream_t stream) {
  return resident ? launch_resident<T, MULTI>(kp, stream) : launch_general<T, MULTI>(kp, blocks, stream);
}

/* Why the kernels would not run p, and the status of that refusal; NULL (DDA_OK) if they run
 * it, with the arguments in kp (build). */
const char *prepare(const dda_low_rank_params *p, dda_status *st, KParams *kp, bool *multi, bool *resident,
                    int64_t *blocks) {
  *st = dda_low_rank_check(p);
  if (const char *why = dda_low_rank_check_reason(p)) return why;
  if (p->dtype != DDA_F16 && p->dtype != DDA_BF16) {
    *st = DDA_ERR_UNSUPPORTED_DTYPE;
    return "the CUDA kernel takes float16 and bfloat16 (tensor cores); float32 runs on the CPU reference only";
  }
  bool al = reinterpret_cast<uintptr_t>(p->t) % 2 == 0 && reinterpret_cast<uintptr_t>(p->out) % 2 == 0;
  for (int s = 0; s < p->num_segments; ++s) al = al && reinterpret_cast<uintptr_t>(p->segments[s].b) % 2 == 0;
  if (!al) {
    *st = DDA_ERR_INVALID_ARGUMENT;
    return "a t, out or b pointer is not aligned to its 2-byte element";
  }
  build(p, kp, multi, resident, blocks);
  if (*blocks > kMaxBlocks) {
    *st = DDA_ERR_GRID_LIMIT;
    return "the launch would need more than 2^31 - 1 thread blocks (64-row tiles x 128-column tiles of the targets)";
  }
  *st = DDA_OK;
  return nullptr;
}

}  // namespace

extern "C" const char *dda_low_rank_supported_cuda(const dda_low_rank_params *p) {
  dda_status st;
  KParams kp;
  bool multi = false, resident = false;
  int64_t blocks = 0;
  return prepare(p, &st, &kp, &multi, &resident, &blocks);
}

extern "C" dda_status dda_low_rank_accumulate_cuda(const dda_low_rank_params *p, cudaStream_t stream) {
  dda_status st;
  KParams kp;
  bool multi = false, resident = false;
  int64_t blocks = 0;
  if (prepare(p, &st, &kp, &multi, &resident, &blocks)) return st;
  if (p->dtype == DDA_F16)
    return multi ? launch<__half, true>(kp, resident, blocks, stream) : launch<__half, false>(kp, resident, blocks, stream);
  return multi ? launch<__nv_bfloat16, true>(kp, resident, blocks, stream)
               : launch<__nv_bfloat16, false>(kp, resident, blocks, stream);
}
