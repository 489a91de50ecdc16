/* sm90_common.cuh: what the two Hopper attention kernels share
 * (attention_fwd_sm90.cu: cp.async, all warpgroups compute; attention_fwd_sm90_tma.cu:
 * TMA producer warpgroup + consumer warpgroups): wgmma fences, shared-memory matrix
 * descriptors and the O store from the m64nN accumulator layout (the online softmax and
 * P packing they share with the mma.sync kernels are in mma_common.cuh).
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

/* O / l to global (4-byte stores of column pairs; rows >= Sq and columns >= D skipped)
 * and the LSE (natural log) of rows g, g + 8 of this warp, row0 = the warp's first row. */
template <typename T, int NO>
__device__ __forceinline__ void store_o(const float (&o)[NO][4], float (&l)[2], const float (&m)[2],
                                        const dda_attention_params &p, int b, int h, int row0, int g, int c) {
  float inv[2];
  quad_row_sums(l, inv);  /* l == 0: every key masked, o = 0, lse = -inf */
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
      p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Sq + row] = lse_value(m[r], l[r]);
  }
}

#endif  // host pass or sm_90a

}  // namespace
