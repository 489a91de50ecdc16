// wgmma_probe.cu: checks the two warpgroup-MMA forms and shared-memory layouts the
// sm_90a attention kernel relies on, in isolation, against a host reference:
//   ss: S[64][64] = Q[64][DP] K[64][DP]^T, both in the interleaved K-major layout
//   rs: O[64][DP] = P[64][16] V[16][DP], P from registers, V interleaved MN-major
// Build (sm_90a only): nvcc -std=c++17 -I csrc/include -gencode=arch=compute_90a,code=sm_90a \
//   csrc/tests/wgmma_probe.cu -o /tmp/wgmma_probe
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "../cuda/mma_common.cuh"
#include "../cuda/wgmma_ops.cuh"

constexpr int DP = 64;

__device__ uint64_t desc(uint32_t a, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

// Interleaved offset (bytes) of element (r, d) in a tile with DP columns.
__host__ __device__ uint32_t il(int r, int d) { return (r / 8) * DP * 16 + (d / 8) * 128 + (r % 8) * 16 + (d % 8) * 2; }

__global__ void probe_ss(const __half *q, const __half *k, float *s, int swap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(128) __half qs[64 * DP], ks[64 * DP];
  for (int i = threadIdx.x; i < 64 * DP; i += 128) {
    const int r = i / DP, d = i % DP;
    qs[il(r, d) / 2] = q[i];
    ks[il(r, d) / 2] = k[i];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const uint32_t lbo = swap ? DP * 16 : 128, sbo = swap ? 128 : DP * 16;
  const uint64_t qd = desc(smem_u32(qs), lbo, sbo), kd = desc(smem_u32(ks), lbo, sbo);
  float acc[32];
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  for (int ks_ = 0; ks_ < DP / 16; ++ks_) wgmma_ss<64, __half>(acc, qd + ks_ * 16, kd + ks_ * 16, 1);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) s[(16 * w + g + 8 * (e / 2)) * 64 + 8 * j + 2 * c + e % 2] = acc[4 * j + e];
#endif
}

__global__ void probe_rs(const __half *pm, const __half *v, float *o, int swap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(128) __half vs[16 * DP];
  for (int i = threadIdx.x; i < 16 * DP; i += 128) vs[il(i / DP, i % DP) / 2] = v[i];
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  auto pk = [&](int r, int col) {
    __half2 h = __halves2half2(pm[r * 16 + col], pm[r * 16 + col + 1]);
    return *reinterpret_cast<uint32_t *>(&h);
  };
  uint32_t a[4] = {pk(16 * w + g, 2 * c), pk(16 * w + g + 8, 2 * c), pk(16 * w + g, 2 * c + 8),
                   pk(16 * w + g + 8, 2 * c + 8)};
  const uint32_t lbo = swap ? 128 : DP * 16, sbo = swap ? DP * 16 : 128;
  const uint64_t vd = desc(smem_u32(vs), lbo, sbo);
  float acc[DP / 2];
  for (int i = 0; i < DP / 2; ++i) acc[i] = 0.0f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  wgmma_rs<DP, __half>(acc, a, vd, 1);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  for (int j = 0; j < DP / 8; ++j)
    for (int e = 0; e < 4; ++e) o[(16 * w + g + 8 * (e / 2)) * DP + 8 * j + 2 * c + e % 2] = acc[4 * j + e];
#endif
}

static int fails = 0;

static void check(const char *what, const std::vector<float> &got, const std::vector<double> &ref, int swap) {
  double err = 0.0;
  for (size_t i = 0; i < got.size(); ++i) err = fmax(err, fabs(got[i] - ref[i]));
  const bool ok = err < 1e-2;
  printf("%s %s: max abs err %.3g\n", ok ? "ok  " : "FAIL", what, err);
  (void)swap;
  if (!ok) ++fails;
}

int main() {
  std::vector<__half> q(64 * DP), k(64 * DP), pm(64 * 16), v(16 * DP);
  std::vector<double> s_ref(64 * 64, 0.0), o_ref(64 * DP, 0.0);
  srand(7);
  auto rnd = [] { return (float)(rand() % 17 - 8) / 8.0f; };  // exact in fp16
  for (auto &x : q) x = __float2half(rnd());
  for (auto &x : k) x = __float2half(rnd());
  for (auto &x : pm) x = __float2half(rnd());
  for (auto &x : v) x = __float2half(rnd());
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 64; ++j)
      for (int d = 0; d < DP; ++d) s_ref[i * 64 + j] += (double)__half2float(q[i * DP + d]) * __half2float(k[j * DP + d]);
  for (int i = 0; i < 64; ++i)
    for (int n = 0; n < DP; ++n)
      for (int kk = 0; kk < 16; ++kk) o_ref[i * DP + n] += (double)__half2float(pm[i * 16 + kk]) * __half2float(v[kk * DP + n]);
  __half *dq, *dk, *dp, *dv;
  float *ds, *dout;
  cudaMalloc(&dq, q.size() * 2); cudaMalloc(&dk, k.size() * 2); cudaMalloc(&dp, pm.size() * 2); cudaMalloc(&dv, v.size() * 2);
  cudaMalloc(&ds, 64 * 64 * 4); cudaMalloc(&dout, 64 * DP * 4);
  cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dp, pm.data(), pm.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice);
  {
    const int swap = 0;
    std::vector<float> s(64 * 64), o(64 * DP);
    cudaMemset(ds, 0xFF, 64 * 64 * 4);
    probe_ss<<<1, 128>>>(dq, dk, ds, swap);
    cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost);
    check("ss m64n64k16 Q K^T, K-major", s, s_ref, swap);
    cudaMemset(dout, 0xFF, 64 * DP * 4);
    probe_rs<<<1, 128>>>(dp, dv, dout, swap);
    cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost);
    check("rs m64n64k16 P V, V MN-major", o, o_ref, swap);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) { printf("FAIL CUDA error %s\n", cudaGetErrorString(e)); return 1; }
  printf("%s\n", fails ? "FAILED" : "PASSED");
  return fails ? 1 : 0;
}
