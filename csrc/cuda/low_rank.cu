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
// is read once, gets the fp32 sum of all its segments, and is written once.
//
// Grid: a 1-D grid of (M tiles) x (column tiles), column tile fastest, so the blocks that run
// together read the same rows of t (from L2 after the first). Column tiles are laid over the
// targets (distinct (col0, n)) and never span two; the host lists each target's segments.
//
// Block: kBM x kBN = 64 x 128 outputs, 4 warps in 2 x 2, each warp 32 x 64 (2 x 8 mma tiles of
// m16n8k16, fp32 accumulators). Per block:
//   1. cp.async the out tile (64 x 128) into shared memory: it streams in while the rest runs;
//   2. cp.async chunk 0 of the first segment (speculatively: its factor is not known yet), then
//      read the target's factors (one load each, overlapping those copies);
//   3. walk the chunks (kKC = 64 ranks of one segment: t[64 x 64] and b[128 x 64]) of the
//      segments whose factor is not 0, double-buffered: the next chunk's copy is in flight while
//      this one's k-steps run (ldmatrix + mma.sync). A chunk of r < 64 ranks runs ceil(r / 16)
//      k-steps; the columns from r to the next multiple of 16 are zeros in t and b;
//   4. at a segment's end: acc += f * part (the segment's own fp32 partial, so the factor is
//      applied in fp32 and never rounded into t); with one segment per target (MULTI = false)
//      there is no separate partial and the factor is applied at the end;
//   5. out tile + alpha * acc, rounded once, in shared memory, then 16-byte stores.
// A target whose factors are all 0 writes nothing.
//
// Fallbacks (same kernel, a per-segment / per-target flag, uniform in the block): t or b chunks
// are copied element by element where the 16-byte path does not hold (pointer not 16-byte
// aligned, t's row stride or r0 not a multiple of 8, r not a multiple of 8); the out tile is read
// and written element by element from the accumulators where out, its row stride, col0 or n is
// not a multiple of 8 elements / 16 bytes.
//
// CUDA graphs: segments, pointers and alpha are kernel arguments (captured); the factors are
// read from device memory at run time, so a replay after an in-place factor update uses the new
// values, and skipping a segment with factor 0 is decided per replay.
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

constexpr int kBM = 64;       // output rows per block
constexpr int kBN = 128;      // output columns per block
constexpr int kKC = 64;       // ranks per staged chunk
constexpr int kThreads = 128; // 4 warps
constexpr int kLdK = kKC + 8; // row stride (elements) of the staged t and b chunks: 144 bytes,
                              // so the 8 rows of an ldmatrix 8x8 fall in distinct bank groups
constexpr int kLdO = kBN + 8; // row stride of the staged out tile (conflict-free fragment access)
constexpr int kStageT = kBM * kLdK;  // elements
constexpr int kStage = kStageT + kBN * kLdK;
constexpr size_t kSmemBytes = static_cast<size_t>(2 * kStage + kBM * kLdO) * 2;  // 72,704 bytes
constexpr int kMaxSeg = DDA_LOW_RANK_MAX_SEGMENTS;

struct KSeg {
  const uint16_t *b;
  int r0, r;
  int vec_t, vec_b;  // 16-byte copies of t's and b's chunks hold
};

struct KTarget {
  int64_t col0;
  int n;
  int tile_begin;          // its first column tile in the grid's column-tile index
  int seg_begin, seg_end;  // its segments in KParams::segs
  int vec_out;             // 16-byte copies of its out tiles hold
};

struct KParams {
  const uint16_t *t;
  uint16_t *out;
  const float *factors;
  int64_t t_stride, out_stride, M;
  float alpha;
  int num_targets, col_tiles;
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

/* part[2][8] += t_chunk[warp rows] . b_chunk[warp cols]^T over ksteps k-steps of 16. a0, a1:
 * this lane's ldmatrix addresses in the t chunk (m-tiles 0, 1), bb: in the b chunk (n-tile 0). */
template <typename T>
__device__ __forceinline__ void chunk_mma(float (&part)[2][8][4], uint32_t a0, uint32_t a1, uint32_t bb,
                                          int ksteps) {
#pragma unroll
  for (int ks = 0; ks < kKC / 16; ++ks) {
    if (ks < ksteps) {
      uint32_t a[2][4];
      ldsm_x4(a[0], a0 + ks * 32);
      ldsm_x4(a[1], a1 + ks * 32);
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        uint32_t bf[4];
        ldsm_x4(bf, bb + jp * 16 * kLdK * 2 + ks * 32);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma16816<T>(part[i][2 * jp], a[i], bf[0], bf[1]);
          mma16816<T>(part[i][2 * jp + 1], a[i], bf[2], bf[3]);
        }
      }
    }
  }
}

template <typename T, bool MULTI>
__global__ void __launch_bounds__(kThreads, 3) low_rank_kernel(const __grid_constant__ KParams p) {
  extern __shared__ __align__(16) uint16_t smem[];
  __shared__ float fac[kMaxSeg];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // this warp's 32 rows and 64 columns of the tile

  // This block's tile: column tile fastest.
  const unsigned ct = blockIdx.x % static_cast<unsigned>(p.col_tiles);
  const unsigned mt = blockIdx.x / static_cast<unsigned>(p.col_tiles);
  int ti = 0;
  while (ti + 1 < p.num_targets && static_cast<int>(ct) >= p.targets[ti + 1].tile_begin) ++ti;
  const KTarget &tg = p.targets[ti];
  const int64_t row0 = static_cast<int64_t>(mt) * kBM;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kBM), p.M - row0));
  const int colt = (static_cast<int>(ct) - tg.tile_begin) * kBN;  // within the target
  const int ncols = min(kBN, tg.n - colt);
  const int seg_begin = tg.seg_begin, seg_end = tg.seg_end;
  uint16_t *out = p.out + row0 * p.out_stride + tg.col0 + colt;
  uint16_t *otile = smem + 2 * kStage;
  const bool vec_out = tg.vec_out != 0;

  if (vec_out) {
#pragma unroll
    for (int it = 0; it < kBM * (kBN / 8) / kThreads; ++it) {
      const int c = tid + it * kThreads, i = c / (kBN / 8), d = (c % (kBN / 8)) * 8;
      const bool ok = i < nrows && d < ncols;
      cp_async16(otile + i * kLdO + d, ok ? out + i * p.out_stride + d : out, ok ? 16 : 0);
    }
  }
  cp_async_commit();
  load_chunk(smem, p, p.segs[seg_begin], row0, nrows, colt, ncols, 0, tid);
  cp_async_commit();
  if (tid < seg_end - seg_begin) fac[tid] = p.factors[p.segs[seg_begin + tid].r0];
  __syncthreads();

  bool any = false;
  for (int s = seg_begin; s < seg_end; ++s) any = any || fac[s - seg_begin] != 0.0f;
  if (!any) {  // every factor 0: nothing to add, out untouched
    cp_async_wait_all();
    return;
  }

  // ldmatrix addresses (see mma_common.cuh's qk_mma): t as the A operand (rows = m, cols = k),
  // b as the "col" B operand (rows = n, cols = k), both row-major in shared memory.
  const uint32_t a_off = ((wm * 32 + (lane & 15)) * kLdK + 8 * (lane >> 4)) * 2;
  const uint32_t b_off = (kStageT + (wn * 64 + (lane & 7) + 8 * (lane >> 4)) * kLdK + 8 * ((lane >> 3) & 1)) * 2;
  const uint32_t base = smem_u32(smem);

  // MULTI: part is each segment's own partial sum; otherwise the one segment accumulates in acc.
  float acc[2][8][4], part[2][8][4];
  float (&pt)[2][8][4] = MULTI ? part : acc;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = pt[i][j][e] = 0.0f;
  float single_f = 0.0f;  // MULTI = false: the one segment's factor

  int s = seg_begin, k0 = 0, stage = 0;
  while (s < seg_end) {
    const bool active = fac[s - seg_begin] != 0.0f;
    const int r = p.segs[s].r;
    // The next chunk: the next 64 ranks of this segment, else the first of the next active one.
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
      chunk_mma<T>(pt, st + a_off, st + a_off + 16 * kLdK * 2, st + b_off, (min(kKC, r - k0) + 15) >> 4);
      if (k0 + kKC >= r) {  // the segment's last chunk
        const float f = fac[s - seg_begin];
        if (MULTI) {
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                acc[i][j][e] += f * pt[i][j][e];
                pt[i][j][e] = 0.0f;
              }
        } else {
          single_f = f;
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next copy into it
    s = ns;
    k0 = nk0;
    stage ^= 1;
  }
  if (!MULTI) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = single_f * acc[i][j][e];
  }

  // Accumulator element e of tile (i, j): row wm*32 + 16 i + g + 8 (e / 2), column wn*64 + 8 j + 2 c + e % 2.
  const int g = lane >> 2, c = lane & 3;
  const float alpha = p.alpha;
  if (vec_out) {
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
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kBM * (kBN / 8) / kThreads; ++it) {
      const int c8 = tid + it * kThreads, i = c8 / (kBN / 8), d = (c8 % (kBN / 8)) * 8;
      if (i < nrows && d < ncols)
        *reinterpret_cast<uint4 *>(out + i * p.out_stride + d) = *reinterpret_cast<const uint4 *>(otile + i * kLdO + d);
    }
  } else {
    T *o = reinterpret_cast<T *>(out);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = wm * 32 + 16 * i + g + 8 * (e >> 1), col = wn * 64 + 8 * j + 2 * c + (e & 1);
          if (row < nrows && col < ncols) {
            T *q = o + row * p.out_stride + col;
            *q = from_f32<T>(to_f32(*q) + alpha * acc[i][j][e]);
          }
        }
  }
}

/* Blocks of one launch at most (the gridDim.x limit). */
constexpr int64_t kMaxBlocks = 2147483647LL;

/* The kernel's arguments from p (checked): targets in order of first appearance, their segments
 * grouped, the 16-byte flags; multi: some target has more than one segment; blocks: the grid
 * (saturated at kMaxBlocks + 1). */
void build(const dda_low_rank_params *p, KParams *kp, bool *multi, int64_t *blocks) {
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
  int nseg = 0, ntg = 0, tiles = 0;
  *multi = false;
  for (int s = 0; s < p->num_segments; ++s) {
    if (done[s]) continue;
    const dda_low_rank_segment &first = p->segments[s];
    KTarget &tg = kp->targets[ntg++];
    tg.col0 = first.col0;
    tg.n = static_cast<int>(first.n);
    tg.tile_begin = tiles;
    tg.seg_begin = nseg;
    tg.vec_out = out_al && first.col0 % 8 == 0 && first.n % 8 == 0;
    tiles += static_cast<int>((first.n + kBN - 1) / kBN);
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
    }
    tg.seg_end = nseg;
    *multi = *multi || tg.seg_end - tg.seg_begin > 1;
  }
  kp->num_targets = ntg;
  kp->col_tiles = tiles;
  const int64_t m_tiles = (p->M + kBM - 1) / kBM;
  *blocks = m_tiles > kMaxBlocks / tiles ? kMaxBlocks + 1 : m_tiles * tiles;
}

template <typename T, bool MULTI>
dda_status launch(const KParams &kp, int64_t blocks, cudaStream_t stream) {
  static std::atomic<unsigned long long> raised{0};
  cudaError_t e = raise_smem_once(low_rank_kernel<T, MULTI>, kSmemBytes, raised);
  if (e != cudaSuccess) return cuda_fail(e);
  low_rank_kernel<T, MULTI><<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(kp);
  e = cudaGetLastError();
  return e == cudaSuccess ? DDA_OK : cuda_fail(e);
}

/* Why the kernel would not run p, and the status of that refusal; NULL (DDA_OK) if it runs it,
 * with its arguments in kp (build). */
const char *prepare(const dda_low_rank_params *p, dda_status *st, KParams *kp, bool *multi, int64_t *blocks) {
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
  build(p, kp, multi, blocks);
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
  bool multi = false;
  int64_t blocks = 0;
  return prepare(p, &st, &kp, &multi, &blocks);
}

extern "C" dda_status dda_low_rank_accumulate_cuda(const dda_low_rank_params *p, cudaStream_t stream) {
  dda_status st;
  KParams kp;
  bool multi = false;
  int64_t blocks = 0;
  if (prepare(p, &st, &kp, &multi, &blocks)) return st;
  if (p->dtype == DDA_F16)
    return multi ? launch<__half, true>(kp, blocks, stream) : launch<__half, false>(kp, blocks, stream);
  return multi ? launch<__nv_bfloat16, true>(kp, blocks, stream) : launch<__nv_bfloat16, false>(kp, blocks, stream);
}
