// linear_harness.cu: standalone test and benchmark of dda_linear_cuda (no torch).
//
// Checks dda_linear_cuda against the fp32 C reference dda_linear_cpu on random cases
// (fixed seed) in fp32 / fp16 / bf16 with odd shapes, bias, residual (also in place),
// alpha/beta != 1, a strided x, a y that is one slice of a packed buffer, pointers that
// are not 16-byte aligned and no workspace; y is poisoned with NaN (all-ones bytes)
// first, and every element outside y's slice must still hold the poison afterwards.
// Then checks graph capture (a warmed-up shape captures and replays; a new shape is
// refused without breaking the capture), a few argument errors, and times SD shapes.
//
// Build (one line; cuBLASLt's headers and library come from the CUDA toolkit, or add
// -I/-L for the nvidia-cu13 wheel and link -l:libcublasLt.so.13):
//   nvcc -std=c++17 -O2 -I csrc/include -gencode=arch=compute_90a,code=sm_90a
//     csrc/tests/linear_harness.cu csrc/cuda/linear.cu csrc/cpu/linear.c
//     csrc/cpu/check.c csrc/cpu/status.c -lcublasLt -o /tmp/lin
// Run: /tmp/lin [--no-bench]   (exit status 0 = all checks passed)
#include <cublasLt.h>
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


// ------------------------------------------------------------------ helpers --

struct Rng {
  uint64_t s;
  float uniform() {  // [-1, 1)
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((s >> 40) * (1.0 / 8388608.0)) - 1.0f;
  }
  int below(int n) { return (int)(((uniform() + 1.0f) * 0.5f) * n) % n; }
};

static size_t esize(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }
static const char *dname(dda_dtype t) { return t == DDA_F32 ? "fp32" : t == DDA_F16 ? "fp16" : "bf16"; }

// Stores v as dtype t at element i of the byte buffer dst; returns the stored value.
static float store(void *dst, size_t i, float v, dda_dtype t) {
  if (t == DDA_F32) {
    ((float *)dst)[i] = v;
    return v;
  }
  if (t == DDA_F16) {
    __half h = __float2half(v);
    ((__half *)dst)[i] = h;
    return __half2float(h);
  }
  __nv_bfloat16 b = __float2bfloat16(v);
  ((__nv_bfloat16 *)dst)[i] = b;
  return __bfloat162float(b);
}

static float load(const void *src, size_t i, dda_dtype t) {
  if (t == DDA_F32) return ((const float *)src)[i];
  if (t == DDA_F16) return __half2float(((const __half *)src)[i]);
  return __bfloat162float(((const __nv_bfloat16 *)src)[i]);
}

// A host matrix in dtype storage plus the same (rounded) values in fp32 for the reference.
struct HostMat {
  std::vector<unsigned char> raw;
  std::vector<float> ref;
};

static HostMat make_mat(size_t n, float scale, dda_dtype t, Rng &rng) {
  HostMat m;
  m.raw.resize(n * esize(t));
  m.ref.resize(n);
  for (size_t i = 0; i < n; ++i) m.ref[i] = store(m.raw.data(), i, scale * rng.uniform(), t);
  return m;
}

static void *to_device(const std::vector<unsigned char> &raw) {
  void *d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, raw.size()));
  CUDA_CHECK(cudaMemcpy(d, raw.data(), raw.size(), cudaMemcpyHostToDevice));
  return d;
}

// ------------------------------------------------------------------- checks --

// Relative L2 tolerances. The reference gets the same rounded inputs in fp32 and
// accumulates in fp32, so the only error that must appear is:
//  - fp32: accumulation order; |error| ~ sqrt(K) * 2^-24 ~ 3e-6 for K = 2048. 1e-5
//    still catches TF32 (unit roundoff 2^-11 on the inputs, ~5e-4 here).
//  - fp16 / bf16: the single rounding of the output, at most u per element, so the
//    normwise relative error is <= u (u = 2^-11 ~ 4.9e-4 / 2^-8 ~ 3.9e-3). We allow
//    3u: an fp16 accumulator (~sqrt(K) u) or a bias scaled by alpha (~10%) fails.
static double tolerance(dda_dtype t) {
  return t == DDA_F32 ? 1e-5 : t == DDA_F16 ? 3.0 * 0x1p-11 : 3.0 * 0x1p-8;
}

struct Case {
  int64_t M, N, K;
  dda_dtype dtype;
  bool bias, residual, in_place;
  float alpha, beta;
  int64_t x_pad;     // x_stride_m = K + x_pad
  int64_t y_slices;  // y_stride_m = y_slices * N; y is slice 1 of 3 when y_slices = 3
  int64_t res_pad;   // residual_stride_m = N + res_pad (in place: y's stride)
  bool misalign;     // x and y start one element past a 16-byte boundary
  bool no_workspace;
};

static void *g_workspace = nullptr;
static int g_failures = 0;

static void fail(const char *what) {
  printf("FAIL: %s\n", what);
  ++g_failures;
}

// Rows compared against the reference: all of them for small M, else three blocks
// (start, middle, tail) so the naive C reference stays fast. All rows are checked
// for NaN / poison.
static std::vector<std::pair<int64_t, int64_t>> sampled_rows(int64_t M) {
  if (M <= 256) return {{0, M}};
  return {{0, 64}, {M / 2 - 32, M / 2 + 32}, {M - 64, M}};
}

static void run_case(const Case &c, Rng &rng) {
  const dda_dtype t = c.dtype;
  const size_t es = esize(t);
  const int64_t M = c.M, N = c.N, K = c.K;
  const int64_t xs = K + c.x_pad;
  const int64_t ys = c.y_slices * N;
  const int64_t y_col0 = c.y_slices > 1 ? N : 0;
  const int64_t mis = c.misalign ? 1 : 0;
  const int64_t rs = c.in_place ? ys : N + c.res_pad;

  // Inputs. w ~ U(-1,1)/sqrt(K) keeps x.w^T ~ O(1), the size of bias and residual,
  // so that a mistake in any one term shows.
  HostMat x = make_mat((size_t)(mis + M * xs), 1.0f, t, rng);
  HostMat w = make_mat((size_t)(N * K), 1.0f / sqrtf((float)K), t, rng);
  HostMat b = make_mat((size_t)N, 1.0f, t, rng);
  HostMat r = make_mat((size_t)(M * rs), 1.0f, t, rng);

  // y buffer: all-ones bytes (NaN in every dtype); in place, y's slice holds the residual.
  const size_t y_elems = (size_t)(mis + M * ys);
  std::vector<unsigned char> y_init(y_elems * es, 0xFF);
  if (c.in_place)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        store(y_init.data(), (size_t)(mis + m * ys + y_col0 + n), r.ref[m * rs + n], t);

  unsigned char *dx = (unsigned char *)to_device(x.raw);
  void *dw = to_device(w.raw);
  void *db = to_device(b.raw);
  void *dr = c.in_place ? nullptr : to_device(r.raw);
  unsigned char *dy = (unsigned char *)to_device(y_init);

  dda_linear_params p;
  memset(&p, 0, sizeof(p));
  p.x = dx + mis * es;
  p.w = dw;
  p.bias = c.bias ? db : nullptr;
  p.y = dy + (mis + y_col0) * es;
  p.residual = !c.residual ? nullptr : c.in_place ? p.y : dr;
  p.x_stride_m = xs;
  p.residual_stride_m = c.residual ? rs : 0;
  p.y_stride_m = ys;
  p.M = M;
  p.N = N;
  p.K = K;
  p.alpha = c.alpha;
  p.beta = c.beta;
  p.dtype = t;

  char label[256];
  snprintf(label, sizeof(label),
           "%s M=%lld N=%lld K=%lld bias=%d res=%d%s a=%.3g b=%.3g xs=%lld ys=%lld rs=%lld%s%s",
           dname(t), (long long)M, (long long)N, (long long)K, c.bias, c.residual,
           c.in_place ? "(in place)" : "", c.alpha, c.beta, (long long)xs, (long long)ys,
           (long long)(c.residual ? rs : 0), c.misalign ? " misaligned" : "",
           c.no_workspace ? " no-workspace" : "");

  void *ws = c.no_workspace ? nullptr : g_workspace;
  size_t ws_bytes = c.no_workspace ? 0 : DDA_LINEAR_WORKSPACE_BYTES;
  dda_status st = dda_linear_cuda(&p, ws, ws_bytes, 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  if (st != DDA_OK) {
    printf("FAIL %s: status %s (backend %d)\n", label, dda_status_string(st),
           dda_last_backend_error());
    ++g_failures;
  } else {
    std::vector<unsigned char> y_out(y_init.size());
    CUDA_CHECK(cudaMemcpy(y_out.data(), dy, y_out.size(), cudaMemcpyDeviceToHost));

    // Outside the slice: untouched poison. Inside: finite.
    bool poison_ok = true, finite_ok = true;
    for (size_t e = 0; e < y_elems; ++e) {
      const int64_t off = (int64_t)e - mis;
      const bool inside = off >= 0 && off % ys >= y_col0 && off % ys < y_col0 + N;
      if (!inside) {
        for (size_t k = 0; k < es; ++k) poison_ok &= y_out[e * es + k] == 0xFF;
      } else {
        finite_ok &= std::isfinite(load(y_out.data(), e, t));
      }
    }

    // Reference on the sampled rows (fp32, same rounded inputs).
    double err2 = 0.0, ref2 = 0.0;
    for (auto rows : sampled_rows(M)) {
      const int64_t r0 = rows.first, n_rows = rows.second - rows.first;
      std::vector<float> ref((size_t)(n_rows * N));
      dda_linear_params q = p;
      q.x = x.ref.data() + mis + r0 * xs;
      q.w = w.ref.data();
      q.bias = c.bias ? b.ref.data() : nullptr;
      q.residual = c.residual ? r.ref.data() + r0 * rs : nullptr;
      q.residual_stride_m = rs;
      q.y = ref.data();
      q.y_stride_m = N;
      q.M = n_rows;
      q.dtype = DDA_F32;
      if (dda_linear_cpu(&q) != DDA_OK) {
        fail("dda_linear_cpu");
        continue;
      }
      for (int64_t m = 0; m < n_rows; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const double g = load(y_out.data(), (size_t)(mis + (r0 + m) * ys + y_col0 + n), t);
          const double d = g - ref[m * N + n];
          err2 += d * d;
          ref2 += (double)ref[m * N + n] * ref[m * N + n];
        }
    }
    const double rel = sqrt(err2 / std::max(ref2, 1e-30));
    const bool ok = poison_ok && finite_ok && rel <= tolerance(t);

    // A second call takes the cached plan: it must give the same bits (not in place,
    // where it would add the residual twice).
    bool repeat_ok = true;
    if (ok && !c.in_place) {
      CUDA_CHECK(cudaMemcpy(dy, y_init.data(), y_init.size(), cudaMemcpyHostToDevice));
      st = dda_linear_cuda(&p, ws, ws_bytes, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<unsigned char> y_again(y_init.size());
      CUDA_CHECK(cudaMemcpy(y_again.data(), dy, y_again.size(), cudaMemcpyDeviceToHost));
      repeat_ok = st == DDA_OK && y_again == y_out;
    }

    const bool pass = ok && repeat_ok;
    printf("%s %s: rel_l2=%.3g (tol %.3g)%s%s%s\n", pass ? "ok  " : "FAIL", label, rel,
           tolerance(t), poison_ok ? "" : " WROTE-OUTSIDE-Y", finite_ok ? "" : " NON-FINITE",
           repeat_ok ? "" : " REPEAT-DIFFERS");
    if (!pass) ++g_failures;
  }
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dw));
  CUDA_CHECK(cudaFree(db));
  if (dr) CUDA_CHECK(cudaFree(dr));
  CUDA_CHECK(cudaFree(dy));
}

static void run_correctness() {
  const int64_t Ms[] = {1, 77, 154, 4096 * 2};
  const int64_t Ns[] = {40 * 8 * 3, 320, 1280, 77};
  const int64_t Ks[] = {320, 768, 2048, 40};
  const float alphas[] = {1.0f, 0.7f, 1.25f};
  const float betas[] = {1.0f, 0.5f, -0.8f};
  Rng rng{0x5eed1234ULL};

  // Fixed cases first: each names one path.
  //   M, N, K, dtype, bias, res, in_place, alpha, beta, x_pad, y_slices, res_pad, misalign, no_ws
  const Case fixed[] = {
      {77, 320, 768, DDA_F16, true, true, false, 0.7f, 0.5f, 0, 1, 0, false, false},
      {154, 320, 320, DDA_F16, true, true, true, 1.0f, 1.0f, 0, 1, 0, false, false},
      {154, 320, 320, DDA_BF16, false, true, true, 0.7f, -0.8f, 0, 3, 0, false, false},
      {8192, 960, 320, DDA_BF16, true, false, false, 1.0f, 1.0f, 0, 1, 0, false, true},
      {77, 77, 40, DDA_F16, true, true, false, 1.25f, 0.5f, 3, 1, 5, true, false},
      {77, 77, 40, DDA_F32, true, true, false, 1.25f, 0.5f, 3, 3, 5, true, false},
      {8192, 320, 320, DDA_F16, true, true, false, 1.0f, 1.0f, 5, 3, 3, false, false},
      {1, 1280, 2048, DDA_F16, true, false, false, 0.7f, 1.0f, 0, 1, 0, false, false},
      {1, 77, 768, DDA_BF16, true, true, false, 1.0f, 0.5f, 0, 3, 0, true, false},
      {1, 960, 40, DDA_F32, false, true, false, 1.0f, 1.0f, 0, 1, 0, false, false},
      {154, 1280, 2048, DDA_F32, true, true, false, 0.7f, 0.5f, 0, 1, 0, false, false},
  };
  for (const Case &c : fixed) run_case(c, rng);

  for (int i = 0; i < 48; ++i) {
    Case c;
    c.M = Ms[rng.below(4)];
    c.N = Ns[rng.below(4)];
    c.K = Ks[rng.below(4)];
    c.dtype = (dda_dtype)(i % 3);
    c.bias = rng.below(2);
    c.residual = rng.below(2);
    c.in_place = c.residual && rng.below(8) == 0;
    c.alpha = alphas[rng.below(3)];
    c.beta = betas[rng.below(3)];
    const int64_t x_pads[] = {0, 8, 3};
    c.x_pad = x_pads[rng.below(3)];
    c.y_slices = rng.below(2) ? 3 : 1;
    c.res_pad = rng.below(2) ? 5 : 0;
    c.misalign = rng.below(6) == 0;
    c.no_workspace = rng.below(8) == 0;
    run_case(c, rng);
  }
}

// -------------------------------------------------------- capture / errors --

// A shape called once outside capture captures and replays; a new shape during capture
// is refused with DDA_ERR_UNPLANNED_IN_CAPTURE and leaves the capture valid.
static void run_capture() {
  const int64_t M = 77, N = 320, K = 768;
  const dda_dtype t = DDA_F16;
  Rng rng{42};
  HostMat x = make_mat((size_t)(M * K), 1.0f, t, rng);
  HostMat w = make_mat((size_t)(N * K), 1.0f / sqrtf((float)K), t, rng);
  HostMat b = make_mat((size_t)N, 1.0f, t, rng);
  void *dx = to_device(x.raw), *dw = to_device(w.raw), *db = to_device(b.raw);
  void *dy = nullptr;
  CUDA_CHECK(cudaMalloc(&dy, (size_t)(M * N) * esize(t)));

  dda_linear_params p;
  memset(&p, 0, sizeof(p));
  p.x = dx; p.w = dw; p.bias = db; p.y = dy;
  p.x_stride_m = K; p.y_stride_m = N;
  p.M = M; p.N = N; p.K = K;
  p.alpha = 0.7f; p.beta = 0.0f; p.dtype = t;

  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  if (dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK)
    fail("capture: warm-up call");
  CUDA_CHECK(cudaStreamSynchronize(s));

  cudaGraph_t graph;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  const dda_status in_capture = dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s);
  dda_linear_params fresh = p;
  fresh.M = M - 1;  // a shape with no plan yet
  const dda_status new_shape = dda_linear_cuda(&fresh, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s);
  const cudaError_t end = cudaStreamEndCapture(s, &graph);
  if (in_capture != DDA_OK) fail("capture: warmed-up shape during capture");
  if (new_shape != DDA_ERR_UNPLANNED_IN_CAPTURE) fail("capture: new shape not refused");
  if (end != cudaSuccess) {
    printf("capture ended with %s\n", cudaGetErrorString(end));
    fail("capture: invalidated");
  } else {
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaMemsetAsync(dy, 0xFF, (size_t)(M * N) * esize(t), s));
    CUDA_CHECK(cudaGraphLaunch(exec, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<unsigned char> y((size_t)(M * N) * esize(t));
    CUDA_CHECK(cudaMemcpy(y.data(), dy, y.size(), cudaMemcpyDeviceToHost));
    std::vector<float> ref((size_t)(M * N));
    dda_linear_params q = p;
    q.x = x.ref.data(); q.w = w.ref.data(); q.bias = b.ref.data(); q.y = ref.data();
    q.dtype = DDA_F32;
    dda_linear_cpu(&q);
    double err2 = 0, ref2 = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double d = load(y.data(), i, t) - ref[i];
      err2 += d * d;
      ref2 += (double)ref[i] * ref[i];
    }
    const double rel = sqrt(err2 / ref2);
    printf("%s graph replay fp16 M=%lld N=%lld K=%lld bias: rel_l2=%.3g (tol %.3g)\n",
           rel <= tolerance(t) ? "ok  " : "FAIL", (long long)M, (long long)N, (long long)K, rel,
           tolerance(t));
    if (!(rel <= tolerance(t))) ++g_failures;
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    CUDA_CHECK(cudaGraphDestroy(graph));
  }
  printf("%s capture: new shape refused with \"%s\"\n",
         new_shape == DDA_ERR_UNPLANNED_IN_CAPTURE ? "ok  " : "FAIL", dda_status_string(new_shape));

  // Argument errors (rejected before any launch).
  dda_linear_params e = p;
  e.residual = dy;
  e.residual_stride_m = N + 1;  // in place with another stride
  if (dda_linear_cuda(&e, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_ERR_INVALID_ARGUMENT)
    fail("residual == y with another stride accepted");
  e.residual = (unsigned char *)dy + N * esize(t);  // one row below y: overlapping
  e.residual_stride_m = N;
  if (dda_linear_cuda(&e, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_ERR_INVALID_ARGUMENT)
    fail("residual overlapping y accepted");
  e = p;
  e.x = (unsigned char *)dx + 1;  // not element-aligned
  if (dda_linear_cuda(&e, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_ERR_INVALID_ARGUMENT)
    fail("unaligned x accepted");
  e = p;
  e.y_stride_m = N - 1;
  if (dda_linear_cuda(&e, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_ERR_INVALID_ARGUMENT)
    fail("y_stride_m < N accepted");
  printf("ok   argument errors checked\n");

  CUDA_CHECK(cudaStreamDestroy(s));
  CUDA_CHECK(cudaFree(dx));
  CUDA_CHECK(cudaFree(dw));
  CUDA_CHECK(cudaFree(db));
  CUDA_CHECK(cudaFree(dy));
}

// ---------------------------------------------------------------- benchmark --

// Median time of dda_linear_cuda over `iters` calls after `warmup`, in ms.
static float time_linear(const dda_linear_params &p, cudaStream_t s, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i)
    if (dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s) != DDA_OK) {
      fail("benchmark call");
      return -1.0f;
    }
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms((size_t)iters);
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(e0, s));
    dda_linear_cuda(&p, g_workspace, DDA_LINEAR_WORKSPACE_BYTES, s);
    CUDA_CHECK(cudaEventRecord(e1, s));
    CUDA_CHECK(cudaEventSynchronize(e1));
    CUDA_CHECK(cudaEventElapsedTime(&ms[(size_t)i], e0, e1));
  }
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[(size_t)iters / 2];
}

static void run_bench() {
  struct Shape {
    int64_t M, N, K;
    bool bias, residual;
    const char *what;
  };
  const Shape shapes[] = {
      {8192, 960, 320, false, false, "SD1.5 64x64 self-attn QKV"},
      {2048, 1920, 640, false, false, "SD1.5 32x32 self-attn QKV"},
      {8192, 320, 320, true, true, "SD1.5 64x64 out proj + bias + residual"},
      {2048, 192, 1280, false, false, "LoRA A side: SDXL 32x32 Q/K/V, 2 x r32"},
      {2048, 64, 1280, false, false, "LoRA A side: SDXL 32x32 Q or out, 2 x r32"},
      {8192, 192, 640, false, false, "LoRA A side: SDXL 64x64 Q/K/V, 2 x r32"},
      {8192, 64, 640, false, false, "LoRA A side: SDXL 64x64 Q or out, 2 x r32"},
      {154, 128, 2048, false, false, "LoRA A side: SDXL context K/V, 2 x r32"},
  };
  cudaDeviceProp prop;
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  int rt = 0;
  CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  printf("\nbenchmark: %s (%d SMs), CUDA runtime %d, cuBLASLt %zu\n", prop.name,
         prop.multiProcessorCount, rt, cublasLtGetVersion());
  printf("TFLOP/s = 2*M*N*K / median time (epilogue not counted); 20 warm-up, 100 timed calls\n");

  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Rng rng{7};
  const dda_dtype dtypes[] = {DDA_F16, DDA_BF16};
  for (const Shape &sh : shapes)
    for (dda_dtype t : dtypes) {
      HostMat x = make_mat((size_t)(sh.M * sh.K), 1.0f, t, rng);
      HostMat w = make_mat((size_t)(sh.N * sh.K), 1.0f / sqrtf((float)sh.K), t, rng);
      HostMat b = make_mat((size_t)sh.N, 1.0f, t, rng);
      HostMat r = make_mat((size_t)(sh.M * sh.N), 1.0f, t, rng);
      void *dx = to_device(x.raw), *dw = to_device(w.raw), *db = to_device(b.raw);
      void *dr = to_device(r.raw), *dy = nullptr;
      CUDA_CHECK(cudaMalloc(&dy, (size_t)(sh.M * sh.N) * esize(t)));
      dda_linear_params p;
      memset(&p, 0, sizeof(p));
      p.x = dx; p.w = dw; p.y = dy;
      p.bias = sh.bias ? db : nullptr;
      p.residual = sh.residual ? dr : nullptr;
      p.x_stride_m = sh.K; p.residual_stride_m = sh.N; p.y_stride_m = sh.N;
      p.M = sh.M; p.N = sh.N; p.K = sh.K;
      p.alpha = 1.0f; p.beta = 1.0f; p.dtype = t;
      const double flop = 2.0 * sh.M * sh.N * sh.K;
      const float ms = time_linear(p, s, 20, 100);
      printf("%-40s %s M=%5lld N=%5lld K=%5lld: %8.4f ms  %6.1f TFLOP/s\n", sh.what, dname(t),
             (long long)sh.M, (long long)sh.N, (long long)sh.K, ms, flop / (ms * 1e-3) / 1e12);
      if (sh.bias || sh.residual) {  // the same GEMM without the epilogue, for its cost
        p.bias = nullptr;
        p.residual = nullptr;
        const float ms0 = time_linear(p, s, 20, 100);
        printf("%-40s %s (no bias/residual):          %8.4f ms  %6.1f TFLOP/s\n", "", dname(t),
               ms0, flop / (ms0 * 1e-3) / 1e12);
      }
      CUDA_CHECK(cudaFree(dx));
      CUDA_CHECK(cudaFree(dw));
      CUDA_CHECK(cudaFree(db));
      CUDA_CHECK(cudaFree(dr));
      CUDA_CHECK(cudaFree(dy));
    }
  CUDA_CHECK(cudaStreamDestroy(s));
}

int main(int argc, char **argv) {
  return harness_main(argc, argv, &g_workspace, DDA_LINEAR_WORKSPACE_BYTES, &g_failures, run_correctness,
                      run_capture, run_bench);
}
