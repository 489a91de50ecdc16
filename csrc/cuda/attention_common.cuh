/* attention_common.cuh: what the attention kernel families and their dispatcher share.
 *
 *   - the base-2 softmax constants and cp.async (global -> shared, 16 bytes);
 *   - the padded head dims of the tensor-core kernels and the 16-byte test on q/k/v/o;
 *   - the folded grid: every family launches a 1-D grid whose block b walks
 *     tile + tiles * (h + H * b), the block order of a (tiles, H, B) grid, without the
 *     65535 limit of grid.y / grid.z (B * H reaches 300,000 in video models); gridDim.x
 *     takes up to 2^31 - 1 blocks, a limit the dispatcher checks through Family::head_blocks;
 *   - the device facts, read once per device (DevInfo);
 *   - the family interface (Family): each attention_fwd_*.cu defines one, and
 *     attention_dispatch.cu holds the table and the one selection.
 */
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "dda.h"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* ------------------------------------------------------------ cp.async -- */

/* 16 bytes global -> shared (dst: a shared-space address); src_bytes = 0 writes zeros
 * and reads nothing. Below sm_80 (generic kernel only) a plain synchronous copy. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
#else
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (src_bytes) v = *reinterpret_cast<const uint4 *>(src);
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#endif
}

/* The same from a generic pointer into shared memory. */
__device__ __forceinline__ void cp_async16(void *smem, const void *src, int src_bytes) {
  cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), src, src_bytes);
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/* Waits until at most N committed groups are still in flight. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() { cp_async_wait<0>(); }
__device__ __forceinline__ void cp_async_wait_one() { cp_async_wait<1>(); }

/* ----------------------------------------------------- padded head dims -- */

/* Head dims the tensor-core kernels compile: D runs at the smallest one >= D (the
 * k-dim of Q K^T must be a multiple of 16; 80 and 160 run at their own width). */
constexpr int kPaddedDims[] = {48, 64, 80, 96, 128, 160, 192, 256};
constexpr int kNumPaddedDims = 8;

/* The padded head dim of D among those <= max_dp, or 0 where none is. */
constexpr int padded_head_dim(int D, int max_dp) {
  for (int i = 0; i < kNumPaddedDims; ++i)
    if (D <= kPaddedDims[i]) return kPaddedDims[i] <= max_dp ? kPaddedDims[i] : 0;
  return 0;
}

/* The index of a padded head dim in kPaddedDims (dp must be one of them). */
inline int padded_index(int dp) {
  int i = 0;
  while (kPaddedDims[i] != dp) ++i;
  return i;
}

/* ------------------------------------------------------------ alignment -- */

inline bool aligned16(const void *ptr, int64_t s0, int64_t s1, int64_t s2, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (s0 * static_cast<int64_t>(elem)) % 16 == 0 &&
         (s1 * static_cast<int64_t>(elem)) % 16 == 0 && (s2 * static_cast<int64_t>(elem)) % 16 == 0;
}

/* Every q/k/v/o pointer and stride 16-byte compatible for 2-byte elements: what the
 * tensor-core kernels need (cp.async and 16-byte stores). */
inline bool qkvo_aligned16(const dda_attention_params *p) {
  return aligned16(p->q, p->q_stride_b, p->q_stride_s, p->q_stride_h, 2) &&
         aligned16(p->k, p->k_stride_b, p->k_stride_s, p->k_stride_h, 2) &&
         aligned16(p->v, p->v_stride_b, p->v_stride_s, p->v_stride_h, 2) &&
         aligned16(p->o, p->o_stride_b, p->o_stride_s, p->o_stride_h, 2);
}

/* ----------------------------------------------------------- the grid -- */

/* The most blocks of one launch: the gridDim.x limit. */
constexpr long long kMaxGridBlocks = 2147483647LL;

/* Blocks of a folded grid of `tiles` blocks per (b, h): tiles x B x H, saturated at
 * kMaxGridBlocks + 1 (the product of int sizes may exceed 64 bits). */
inline long long folded_blocks(long long tiles, const dda_attention_params *p) {
  const long long bh = static_cast<long long>(p->B) * p->H;
  if (tiles > 0 && bh > kMaxGridBlocks / tiles) return kMaxGridBlocks + 1;
  return tiles * bh;
}

/* The 1-D grid of `tiles` blocks per (b, h); false where it exceeds kMaxGridBlocks (the
 * dispatcher has refused such a launch already: Family::head_blocks). */
inline bool fold_grid(long long tiles, const dda_attention_params *p, dim3 *grid) {
  const long long blocks = folded_blocks(tiles, p);
  if (tiles < 1 || blocks > kMaxGridBlocks) return false;
  *grid = dim3(static_cast<unsigned>(blocks), 1, 1);
  return true;
}

/* This block's tile (the former blockIdx.x), head and batch index in a fold_grid grid:
 * three 32-bit divisions once per block (gridDim.x and B * H are below 2^31). */
struct BlockCoords {
  int tile, h, b;
};
__device__ __forceinline__ BlockCoords block_coords(const dda_attention_params &p) {
  const unsigned bh_count = static_cast<unsigned>(p.B) * static_cast<unsigned>(p.H);
  const unsigned tiles = gridDim.x / bh_count;
  const unsigned bh = blockIdx.x / tiles;
  const unsigned h = bh % static_cast<unsigned>(p.H);
  return BlockCoords{static_cast<int>(blockIdx.x - bh * tiles), static_cast<int>(h),
                     static_cast<int>(bh / static_cast<unsigned>(p.H))};
}

}  // namespace

namespace dda_attn {

/* Device facts the families and the dispatcher need (attention_dispatch.cu). */
struct DevInfo {
  int cc_major, cc_minor, sms;
  size_t block_smem, sm_smem; /* opt-in shared memory per block, per SM */
  bool sm90;                  /* this binary holds the sm_90a kernels for the device */
};

/* The current device's facts, read once per device id < 64. No stream work. */
cudaError_t device_info(DevInfo *out);

/* 1 when this binary holds the sm_90a kernels for the current device (a Hopper part and
 * a build with 9.0a), 0 when not, -1 on a CUDA error (attention_fwd_sm90.cu). */
int sm90_built();

/* One attention kernel family behind one interface. Static strings throughout. */
struct Family {
  dda_attention_backend backend; /* its name: dda_attention_backend_name(backend) */
  /* Why it cannot run p (checked params) on d: dtype, head dim, key length, mask,
   * alignment, device, build; NULL if it can, shared memory permitting. */
  const char *(*unsupported)(const dda_attention_params *p, const DevInfo &d);
  /* Shared memory per block it needs to take p on d (the dispatcher compares it with
   * d.block_smem); only called where unsupported() is NULL. */
  size_t (*smem)(const dda_attention_params *p, const DevInfo &d);
  /* Thread blocks per (b, h) of its launch for p on d (the grid is that x B x H, folded);
   * at most that where it depends on occupancy. The dispatcher refuses p where the grid
   * would exceed kMaxGridBlocks. Only called where unsupported() is NULL. */
  long long (*head_blocks)(const dda_attention_params *p, const DevInfo &d);
  /* Whether the automatic dispatch picks it among the families that take p. */
  bool (*preferred)(const dda_attention_params *p, const DevInfo &d);
  /* The exact kernel (tile included) it launches for p on d. */
  const char *(*kernel)(const dda_attention_params *p, const DevInfo &d);
  /* Runs it; p->scale_log2 is set. Never synchronises. */
  dda_status (*launch)(const dda_attention_params *p, const DevInfo &d, cudaStream_t stream);
};

extern const Family kGenericFamily, kMmaFamily, kShortFamily, kD512Family, kSm90Family, kSm90TmaFamily;

/* Reasons more than one family gives. */
constexpr const char *kNeedsHalf = "needs float16 or bfloat16 inputs";
constexpr const char *kNeedsSm80 = "needs compute capability 8.0 or newer";
constexpr const char *kNeedsAligned =
    "needs q, k, v and out 16-byte aligned with strides of a multiple of 8 elements";
constexpr const char *kNeedsSm90 =
    "needs a Hopper (sm_90) device and a build with 9.0a in TORCH_CUDA_ARCH_LIST";

}  // namespace dda_attn
