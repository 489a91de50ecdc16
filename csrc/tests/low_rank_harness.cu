// low_rank_harness.cu: standalone test and benchmark of dda_low_rank_accumulate_cuda (no torch).
//
// Checks the kernel against the C reference dda_low_rank_accumulate_cpu run on the same f16 /
// bf16 storage: odd M, ranks 1 .. 200, several segments per target, several targets, odd col0
// and n, t / out / b at misaligned offsets with odd row strides, 16 segments, a zero factor over
// inf in t, a NaN factor, every factor 0 (nothing written), ranks padded to 16 and the
// resident kernel's rank limit and one past it (low_rank.cu runs two kernels). out sits inside a wider buffer
// poisoned with NaN: everything outside the target columns must keep the poison. Then a CUDA
// graph is captured once and replayed after in-place factor changes (a segment to 0 and back).
// Then times SDXL-like LoRA shapes: this kernel against the sequential way it replaces (one
// cuBLASLt GEMM per segment accumulating into out, dda_linear_cuda with beta = 1), and the
// projection's base GEMM (K = the width) alone and followed by this kernel (what LoRA adds to
// a projection's B side); all as CUDA graphs of 20 calls (the pipelines replay graphs), median
// of 15 replays.
//
// Build (one line):
//   nvcc -std=c++17 -O2 -I csrc/include -gencode=arch=compute_90a,code=sm_90a
//     csrc/tests/low_rank_harness.cu csrc/cuda/low_rank.cu csrc/cuda/linear.cu csrc/cpu/low_rank.c
//     csrc/cpu/linear.c csrc/cpu/check.c csrc/cpu/status.c -lcublasLt -o /tmp/lowrank
// Run: /tmp/lowrank [--no-bench]   (exit status 0 = all checks passed)
// Adding -DDDA_LOW_RANK_GENERAL_ONLY builds one that runs the general kernel for everything:
// the two binaries' timings compare the kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dda.h"
#include "harness_common.h"


namespace {

int g_failures = 0;

void fail(const char *what) {
  ++g_failures;
  printf("  FAIL: %s\n", what);
}

struct Rng {
  uint64_t s;
  float uniform() {  // [-1, 1)
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((s >> 40) * (1.0 / 8388608.0)) - 1.0f;
  }
};

uint16_t to_bits(float v, dda_dtype t) {
  if (t == DDA_F16) {
    const __half h = __float2half(v);
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
  }
  const __nv_bfloat16 b = __float2bfloat16(v);
  uint16_t u;
  memcpy(&u, &b, 2);
  return u;
}

float from_bits(uint16_t u, dda_dtype t) {
  if (t == DDA_F16) {
    __half h;
    memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 b;
  memcpy(&b, &u, 2);
  return __bfloat162float(b);
}

const char *dname(dda_dtype t) { return t == DDA_F16 ? "fp16" : "bf16"; }

constexpr uint16_t kPoison = 0x7fff;  // a NaN in both fp16 and bf16

struct Seg {
  int64_t r0, r1, col0, n;
};

// One case: sizes, segments, layout offsets (elements) and what to plant in t / factors.
struct Case {
  const char *what;
  int64_t M, R, N;
  std::vector<Seg> segs;
  int64_t t_off, t_pad;      // t at this element offset, row stride R + t_pad
  int64_t out_off, out_pad;  // out at column out_off of a buffer of row stride N + out_pad
  bool b_odd;                // each b at an odd element offset (2-byte aligned only)
  int special;               // 0 none, 1: segment 1's factor 0 over inf in t, 2: segment 0's factor NaN,
                             // 3: every factor 0
};

// Device and host copies of one case in dtype t.
struct Buffers {
  std::vector<uint16_t> t, out, b_all;
  std::vector<float> factors;
  std::vector<size_t> b_at;  // element offset of each segment's b in b_all
  uint16_t *dt = nullptr, *dout = nullptr, *db = nullptr;
  float *dfac = nullptr;
  int64_t t_stride, out_stride;

  void release() {
    CUDA_CHECK(cudaFree(dt));
    CUDA_CHECK(cudaFree(dout));
    CUDA_CHECK(cudaFree(db));
    CUDA_CHECK(cudaFree(dfac));
  }
};

Buffers make_buffers(const Case &c, dda_dtype t, Rng &rng) {
  Buffers B;
  B.t_stride = c.R + c.t_pad;
  B.out_stride = c.N + c.out_pad;
  B.t.assign((size_t)(c.t_off + c.M * B.t_stride), 0);
  for (auto &v : B.t) v = to_bits(rng.uniform() * 2.0f, t);
  B.out.assign((size_t)(c.M * B.out_stride), kPoison);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t j = 0; j < c.N; ++j) B.out[(size_t)(m * B.out_stride + c.out_off + j)] = to_bits(rng.uniform(), t);
  B.factors.assign((size_t)c.R, 0.0f);
  size_t at = 0;
  for (const Seg &s : c.segs) {
    const float f = 0.3f + 0.7f * (rng.uniform() + 1.0f);
    for (int64_t r = s.r0; r < s.r1; ++r) B.factors[(size_t)r] = f;
    at += c.b_odd ? 1 : 0;
    B.b_at.push_back(at);
    at += (size_t)(s.n * (s.r1 - s.r0));
    at = c.b_odd ? at : (at + 7) / 8 * 8;
  }
  B.b_all.assign(at + 8, 0);
  for (size_t i = 0; i < c.segs.size(); ++i) {
    const Seg &s = c.segs[i];
    const float sc = 1.0f / sqrtf((float)(s.r1 - s.r0));
    for (int64_t e = 0; e < s.n * (s.r1 - s.r0); ++e) B.b_all[B.b_at[i] + (size_t)e] = to_bits(rng.uniform() * sc, t);
  }
  if (c.special == 1) {
    const Seg &s = c.segs[1];
    for (int64_t r = s.r0; r < s.r1; ++r) {
      B.factors[(size_t)r] = 0.0f;
      for (int64_t m = 0; m < c.M; ++m) B.t[(size_t)(c.t_off + m * B.t_stride + r)] = to_bits(INFINITY, t);
    }
  } else if (c.special == 2) {
    for (int64_t r = c.segs[0].r0; r < c.segs[0].r1; ++r) B.factors[(size_t)r] = NAN;
  } else if (c.special == 3) {
    std::fill(B.factors.begin(), B.factors.end(), 0.0f);
  }
  CUDA_CHECK(cudaMalloc(&B.dt, B.t.size() * 2));
  CUDA_CHECK(cudaMalloc(&B.dout, B.out.size() * 2));
  CUDA_CHECK(cudaMalloc(&B.db, B.b_all.size() * 2));
  CUDA_CHECK(cudaMalloc(&B.dfac, B.factors.size() * 4));
  CUDA_CHECK(cudaMemcpy(B.dt, B.t.data(), B.t.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(B.dout, B.out.data(), B.out.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(B.db, B.b_all.data(), B.b_all.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(B.dfac, B.factors.data(), B.factors.size() * 4, cudaMemcpyHostToDevice));
  return B;
}

// The params over (host or device) storage.
dda_low_rank_params params(const Case &c, const Buffers &B, dda_dtype t, bool device, float alpha) {
  dda_low_rank_params p;
  memset(&p, 0, sizeof(p));
  p.t = (device ? B.dt : B.t.data()) + c.t_off;
  p.out = (device ? B.dout : const_cast<uint16_t *>(B.out.data())) + c.out_off;
  p.factors = device ? B.dfac : B.factors.data();
  p.t_stride = B.t_stride;
  p.out_stride = B.out_stride;
  p.M = c.M;
  p.R = c.R;
  p.N = c.N;
  p.alpha = alpha;
  p.dtype = t;
  p.num_segments = (int)c.segs.size();
  for (size_t i = 0; i < c.segs.size(); ++i) {
    const Seg &s = c.segs[i];
    p.segments[i] = {(device ? B.db : B.b_all.data()) + B.b_at[i], s.r0, s.r1, s.col0, s.n};
  }
  return p;
}

// Compares the device out buffer with `expect` (the reference's buffer): within one unit of the
// dtype's rounding at the value (plus fp32 sum-order slack), equal where not finite, and the
// poison kept bit for bit everywhere outside the target columns. Returns the mismatch count.
int compare(const Case &c, const Buffers &B, const std::vector<uint16_t> &expect, dda_dtype t) {
  std::vector<uint16_t> got(B.out.size());
  CUDA_CHECK(cudaMemcpy(got.data(), B.dout, got.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<char> target((size_t)B.out_stride, 0);
  for (const Seg &s : c.segs)
    for (int64_t j = 0; j < s.n; ++j) target[(size_t)(c.out_off + s.col0 + j)] = 1;
  const float ulp = t == DDA_F16 ? 1.0f / 1024 : 1.0f / 128;
  int bad = 0;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t j = 0; j < B.out_stride; ++j) {
      const size_t i = (size_t)(m * B.out_stride + j);
      bool ok;
      if (!target[(size_t)j]) {
        ok = got[i] == expect[i];
      } else {
        const float g = from_bits(got[i], t), e = from_bits(expect[i], t);
        if (!std::isfinite(e)) ok = std::isnan(e) ? std::isnan(g) : g == e;
        else ok = std::isfinite(g) && fabsf(g - e) <= ulp * std::max(fabsf(e), 1.0f) * 1.01f;
      }
      if (!ok && bad++ < 3)
        printf("    row %lld col %lld: got %g, expected %g\n", (long long)m, (long long)j, from_bits(got[i], t),
               from_bits(expect[i], t));
    }
  return bad;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  const std::vector<Seg> qkv = {{0, 32, 0, 80},   {32, 64, 80, 80},   {64, 96, 160, 80},
                                {96, 160, 0, 80}, {160, 224, 80, 80}, {224, 288, 160, 80}};
  for (int64_t M : {1, 77, 4097}) {
    v.push_back({"one segment r 64", M, 64, 96, {{0, 64, 0, 96}}, 0, 0, 0, 0, false, 0});
    v.push_back({"rank 1, odd columns", M, 1, 40, {{0, 1, 5, 33}}, 0, 0, 0, 0, false, 0});
    v.push_back({"two adapters (r 4, 20) on one target", M, 24, 48, {{0, 4, 0, 48}, {4, 24, 0, 48}}, 0, 0, 0, 0,
                 false, 0});
    v.push_back({"2 adapters x Q/K/V (r 32, 64)", M, 288, 240, qkv, 0, 0, 0, 0, false, 0});
  }
  v.push_back({"qkv in a wider out buffer", 333, 288, 240, qkv, 0, 0, 16, 24, false, 0});
  v.push_back({"ranks 130 and 200, 300 / 256 columns", 200, 330, 700,
               {{0, 130, 8, 300}, {130, 330, 8, 300}, {0, 200, 400, 256}}, 0, 0, 0, 0, false, 0});
  v.push_back({"misaligned t, out and b, odd strides", 150, 45, 203,
               {{0, 13, 0, 100}, {13, 45, 0, 100}, {13, 45, 130, 64}}, 1, 3, 3, 5, true, 0});
  std::vector<Seg> many;
  for (int s = 0; s < 16; ++s) many.push_back({s * 16, s * 16 + 16, (s % 4) * 136, 136});
  v.push_back({"16 segments on 4 targets", 333, 256, 544, many, 0, 0, 0, 0, false, 0});
  v.push_back({"zero factor over inf in t", 97, 288, 240, qkv, 0, 0, 0, 0, false, 1});
  v.push_back({"NaN factor", 97, 52, 130, {{0, 20, 3, 77}, {20, 52, 88, 40}}, 0, 0, 0, 0, false, 2});
  v.push_back({"every factor 0", 97, 288, 240, qkv, 0, 0, 0, 0, false, 3});
  v.push_back({"ranks 8 and 24 (zero-padded to 16 and 32), 2 targets", 130, 64, 256,
               {{0, 8, 0, 128}, {8, 32, 0, 128}, {32, 64, 128, 128}}, 0, 0, 0, 0, false, 0});
  v.push_back({"ranks 64 + 64 on one target (the resident limit)", 200, 128, 192,
               {{0, 64, 0, 192}, {64, 128, 0, 192}}, 0, 0, 0, 0, false, 0});
  v.push_back({"ranks 64 + 72 on one target (past it)", 200, 136, 192,
               {{0, 64, 0, 192}, {64, 136, 0, 192}}, 0, 0, 0, 0, false, 0});
  v.push_back({"300001 rows, 2 targets", 300001, 32, 136, {{0, 16, 0, 64}, {16, 32, 64, 72}}, 0, 0, 0, 0, false, 0});
  return v;
}

void run_correctness() {
  printf("correctness against the C reference (same storage)\n");
  Rng rng{1};
  for (const Case &c : cases())
    for (dda_dtype t : {DDA_F16, DDA_BF16}) {
      Buffers B = make_buffers(c, t, rng);
      std::vector<uint16_t> expect = B.out;
      dda_low_rank_params hp = params(c, B, t, false, 0.7f);
      hp.out = expect.data() + c.out_off;
      if (dda_low_rank_accumulate_cpu(&hp) != DDA_OK) fail("the C reference refused the case");
      const dda_low_rank_params dp = params(c, B, t, true, 0.7f);
      const dda_status st = dda_low_rank_accumulate_cuda(&dp, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
      const int bad = st == DDA_OK ? compare(c, B, expect, t) : -1;
      printf("  %-40s %s M=%-6lld %s\n", c.what, dname(t), (long long)c.M,
             bad == 0 ? "ok" : st != DDA_OK ? dda_status_string(st) : "MISMATCH");
      if (bad != 0) fail(c.what);
      B.release();
    }
}

void run_capture() {
  printf("CUDA graph: replays after in-place factor changes\n");
  Rng rng{2};
  const Case c = cases()[11];  // 2 adapters x Q/K/V, 4097 rows
  const dda_dtype t = DDA_F16;
  Buffers B = make_buffers(c, t, rng);
  const dda_low_rank_params dp = params(c, B, t, true, 1.0f);
  uint16_t *base = nullptr;
  CUDA_CHECK(cudaMalloc(&base, B.out.size() * 2));
  CUDA_CHECK(cudaMemcpy(base, B.out.data(), B.out.size() * 2, cudaMemcpyHostToDevice));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  if (dda_low_rank_accumulate_cuda(&dp, s) != DDA_OK) fail("warm-up call");
  CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  CUDA_CHECK(cudaMemcpyAsync(B.dout, base, B.out.size() * 2, cudaMemcpyDeviceToDevice, s));
  const dda_status st = dda_low_rank_accumulate_cuda(&dp, s);
  CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  if (st != DDA_OK) fail("call during capture");
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const std::vector<float> saved = B.factors;
  const char *steps[4] = {"as captured", "segment 1 off", "back on", "scaled by -2"};
  for (int step = 0; step < 4; ++step) {
    if (step == 1)
      for (int64_t r = c.segs[1].r0; r < c.segs[1].r1; ++r) B.factors[(size_t)r] = 0.0f;
    if (step == 2) B.factors = saved;
    if (step == 3)
      for (float &f : B.factors) f *= -2.0f;
    CUDA_CHECK(cudaMemcpy(B.dfac, B.factors.data(), B.factors.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaGraphLaunch(exec, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<uint16_t> expect = B.out;
    dda_low_rank_params hp = params(c, B, t, false, 1.0f);
    hp.out = expect.data() + c.out_off;
    dda_low_rank_accumulate_cpu(&hp);
    const int bad = compare(c, B, expect, t);
    printf("  replay, %-14s %s\n", steps[step], bad == 0 ? "ok" : "MISMATCH");
    if (bad) fail(steps[step]);
  }
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(s));
  CUDA_CHECK(cudaFree(base));
  B.release();
}

// ---------------------------------------------------------------- benchmark --

void *g_workspace = nullptr;

// Median time of one call: graphs of `calls` calls of `body`, replayed 15 times after 3.
template <typename F>
float time_graph(cudaStream_t s, int calls, F body) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) body();
  CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int rep = 0; rep < 18; ++rep) {
    CUDA_CHECK(cudaEventRecord(e0, s));
    CUDA_CHECK(cudaGraphLaunch(exec, s));
    CUDA_CHECK(cudaEventRecord(e1, s));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (rep >= 3) ms.push_back(t / calls);
  }
  std::sort(ms.begin(), ms.end());
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  return ms[ms.size() / 2];
}

void run_bench() {
  struct Shape {
    const char *what;
    int64_t M, inner;
    int targets, adapters, rank;
  };
  const Shape shapes[] = {
      {"one segment (the brief's point)", 2048, 1280, 1, 1, 64},
      {"SDXL 32x32 B=2 Q/K/V, 2 adapters", 2048, 1280, 3, 2, 64},
      {"SDXL 32x32 B=2 out proj, 2 adapters", 2048, 1280, 1, 2, 64},
      {"SDXL 64x64 B=2 Q/K/V, 2 adapters", 8192, 640, 3, 2, 64},
      {"SDXL 64x64 B=2 out proj, 2 adapters", 8192, 640, 1, 2, 64},
      {"SDXL 64x64 B=2 Q/K/V, 2 adapters r 128", 8192, 640, 3, 2, 128},
      {"SDXL 32x32 B=2 Q/K/V, 2 adapters r 32", 2048, 1280, 3, 2, 32},
      {"SDXL 32x32 B=2 out proj, 2 adapters r 32", 2048, 1280, 1, 2, 32},
      {"SDXL 64x64 B=2 Q/K/V, 2 adapters r 32", 8192, 640, 3, 2, 32},
      {"SDXL 64x64 B=2 out proj, 2 adapters r 32", 8192, 640, 1, 2, 32},
      {"SDXL 32x32 B=2 Q/K/V, 1 adapter r 16", 2048, 1280, 3, 1, 16},
  };
  cudaDeviceProp prop;
  int dev = 0, rt = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  printf("\nbenchmark: %s (%d SMs), CUDA runtime %d; graphs of 20 calls, median of 15 replays\n", prop.name,
         prop.multiProcessorCount, rt);
  printf("bytes = out read + write + t + every b (each once); GB/s = bytes / time\n");
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Rng rng{3};
  for (const Shape &sh : shapes)
    for (dda_dtype t : {DDA_F16, DDA_BF16}) {
      Case c{sh.what, sh.M, (int64_t)sh.targets * sh.adapters * sh.rank, (int64_t)sh.targets * sh.inner, {},
             0, 0, 0, 0, false, 0};
      for (int a = 0; a < sh.adapters; ++a)
        for (int g = 0; g < sh.targets; ++g) {
          const int64_t r0 = (int64_t)(a * sh.targets + g) * sh.rank;
          c.segs.push_back({r0, r0 + sh.rank, g * sh.inner, sh.inner});
        }
      Buffers B = make_buffers(c, t, rng);
      const dda_low_rank_params dp = params(c, B, t, true, 0.01f);
      const float ms = time_graph(s, 20, [&] {
        if (dda_low_rank_accumulate_cuda(&dp, s) != DDA_OK) fail("benchmark call");
      });
      // The sequential way: one GEMM per segment, beta = 1 into out (plans built before capture).
      std::vector<dda_linear_params> lin;
      for (size_t i = 0; i < c.segs.size(); ++i) {
        const Seg &g = c.segs[i];
        dda_linear_params p;
        memset(&p, 0, sizeof(p));
        p.x = B.dt + g.r0;
        p.w = B.db + B.b_at[i];
        p.residual = p.y = B.dout + g.col0;
        p.x_stride_m = B.t_stride;
        p.residual_stride_m = p.y_stride_m = B.out_stride;
        p.M = c.M;
        p.N = g.n;
        p.K = g.r1 - g.r0;
        p.alpha = 0.01f * B.factors[(size_t)g.r0];
        p.beta = 1.0f;
        p.dtype = t;
        lin.push_back(p);
        if (dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) fail("linear warm-up");
      }
      CUDA_CHECK(cudaStreamSynchronize(s));
      const float ms_seq = time_graph(s, 20, [&] {
        for (const dda_linear_params &p : lin)
          if (dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) fail("linear call");
      });
      double bytes = 2.0 * 2 * c.M * c.N + 2.0 * c.M * c.R;
      for (const Seg &g : c.segs) bytes += 2.0 * g.n * (g.r1 - g.r0);
      printf("%-40s %s M=%5lld N=%5lld R=%4lld %2zu segs: %7.2f us (%6.0f GB/s)  sequential GEMMs %7.2f us  (%.2fx)\n",
             sh.what, dname(t), (long long)c.M, (long long)c.N, (long long)c.R, c.segs.size(), ms * 1e3,
             bytes / (ms * 1e-3) / 1e9, ms_seq * 1e3, ms_seq / ms);

      // The whole projection (K = inner): its base GEMM alone, and followed by this kernel.
      const int64_t K = sh.inner;
      std::vector<uint16_t> hx((size_t)(c.M * K)), hw((size_t)(c.N * K));
      for (auto &v : hx) v = to_bits(rng.uniform(), t);
      for (auto &v : hw) v = to_bits(rng.uniform() / sqrtf((float)K), t);
      uint16_t *dx = nullptr, *dw = nullptr;
      CUDA_CHECK(cudaMalloc(&dx, hx.size() * 2));
      CUDA_CHECK(cudaMalloc(&dw, hw.size() * 2));
      CUDA_CHECK(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dw, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice));
      dda_linear_params base;
      memset(&base, 0, sizeof(base));
      base.x = dx;
      base.w = dw;
      base.y = B.dout;
      base.x_stride_m = K;
      base.y_stride_m = B.out_stride;
      base.M = c.M;
      base.N = c.N;
      base.K = K;
      base.alpha = 1.0f;
      base.dtype = t;
      if (dda_linear_cuda(&base, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) fail("base GEMM warm-up");
      CUDA_CHECK(cudaStreamSynchronize(s));
      const float ms_base = time_graph(s, 20, [&] {
        if (dda_linear_cuda(&base, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) fail("base GEMM");
      });
      const float ms_both = time_graph(s, 20, [&] {
        if (dda_linear_cuda(&base, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) fail("base GEMM");
        if (dda_low_rank_accumulate_cuda(&dp, s) != DDA_OK) fail("accumulate");
      });
      printf("%-40s %s   K=%5lld: base GEMM %7.2f us, then this kernel %7.2f us (+%.2f)\n", "", dname(t),
             (long long)K, ms_base * 1e3, ms_both * 1e3, (ms_both - ms_base) * 1e3);
      CUDA_CHECK(cudaFree(dx));
      CUDA_CHECK(cudaFree(dw));
      B.release();
    }
  CUDA_CHECK(cudaStreamDestroy(s));
}

}  // namespace

int main(int argc, char **argv) {
  return harness_main(argc, argv, &g_workspace, DDA_LINEAR_WORKSPACE_BYTES, &g_failures, run_correctness,
                      run_capture, run_bench);
}
