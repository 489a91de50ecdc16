/* mma_common.cuh: the PTX wrappers and softmax helpers shared by the tensor-core
 * attention kernels (attention_fwd_mma.cu for D <= 256, attention_fwd_d512.cu above).
 * Fragment layouts of mma.sync m16n8k16 are described in attention_fwd_mma.cu. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr float kLog2e = 1.4426950408889634f;

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

}  // namespace
