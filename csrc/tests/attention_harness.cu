// attention_harness.cu: standalone test and benchmark of dda_attention_fwd_cuda (no torch).
//
// Checks dda_attention_fwd_cuda in fp32 / fp16 / bf16 against the fp32 C reference
// dda_attention_fwd_cpu on odd shapes (Sq, Sk in {1, 77, 97, 257}, D in {40, 64, 80, 128,
// 160, 512}), self-attention on a packed qkv [B, S, 3, H, D] and cross-attention on q
// [B, Sq, H, D] with kv [B, Sk, 2, H, D]; masks: none, additive fp32 [B,1,1,Sk] with -inf
// keys, bool [B,1,Sq,Sk] with fully masked rows, additive fp16 [B,H,Sq,Sk], additive bf16
// [1,1,Sq,Sk]; with and without lse; some cases with k/v/q/o not 16-byte aligned.
// o has a padded row stride (H*D + 8) and starts poisoned (all-ones bytes: NaN in every
// dtype); every element of o must be written and finite and the padding must stay poison.
// lse starts poisoned too. --big adds S = 4097 cases (a subset of query rows checked
// against the reference) and times the Stable Diffusion shapes in fp16.
// --many runs only the many-short-sequences cases (B * H from 70,000 to 300,000, 16 query
// rows: AnimateDiff-style temporal attention, far beyond the 65535 of gridDim.y / z; inputs
// generated on the device, sampled sequences checked); --big runs them too.
// --backend NAME runs every case on one kernel family (generic, mma, short, d512, sm90,
// sm90_tma; default auto); cases the family does not take are skipped, with the reason.
//
// Build (add -gencode=arch=compute_80,code=sm_80 for Ampere):
//   nvcc -std=c++17 -O2 -I csrc/include -gencode=arch=compute_90a,code=sm_90a
//     csrc/tests/attention_harness.cu csrc/cuda/attention_dispatch.cu csrc/cuda/attention_fwd*.cu
//     csrc/cpu/attention_fwd.c csrc/cpu/check.c csrc/cpu/status.c -o /tmp/attn_harness
// Run: /tmp/attn_harness [--big] [--many] [--unmasked] [--iters N] [--backend NAME]
//   (exit status 0 = all checks passed)
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
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(s >> 33);
  }
  int below(int n) { return (int)(next() % (uint32_t)n); }
  // A multiple of 1/256 in (-1, 1): at most 8 significant bits, so exact in bf16, fp16
  // and fp32. Every dtype then sees the same inputs and one fp32 reference serves all.
  float grid() { return (float)(below(511) - 255) / 256.0f; }
};

static size_t esize(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }
static const char *dname(dda_dtype t) { return t == DDA_F32 ? "fp32" : t == DDA_F16 ? "fp16" : "bf16"; }

static void store(void *dst, size_t i, float v, dda_dtype t) {
  if (t == DDA_F32) ((float *)dst)[i] = v;
  else if (t == DDA_F16) ((__half *)dst)[i] = __float2half_rn(v);
  else ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
}

static float load(const void *src, size_t i, dda_dtype t) {
  if (t == DDA_F32) return ((const float *)src)[i];
  if (t == DDA_F16) return __half2float(((const __half *)src)[i]);
  return __bfloat162float(((const __nv_bfloat16 *)src)[i]);
}

static std::vector<unsigned char> convert(const std::vector<float> &x, dda_dtype t) {
  std::vector<unsigned char> raw(x.size() * esize(t));
  for (size_t i = 0; i < x.size(); ++i) store(raw.data(), i, x[i], t);
  return raw;
}

static void *to_device(const void *src, size_t bytes) {
  void *d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, bytes));
  CUDA_CHECK(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
  return d;
}

// Relative L2 tolerances. The inputs are exact in every dtype and the reference is fp32,
// so the kernel's error is summation order plus the rounding of o to its dtype:
//  - fp32: order and exp2f vs expf, ~1e-6 relative; 1e-5 still catches any fp16/tf32
//    rounding inside the kernel (~5e-4).
//  - fp16: one rounding of o, <= u = 2^-11 ~ 4.9e-4 relative per element; 2e-3 (~4u)
//    leaves room for order effects but fails fp16 scores or an fp16 P (~1e-2 here).
//  - bf16: u = 2^-8 ~ 3.9e-3; 1.5e-2 (~4u) likewise.
// Max abs error: |o| <= 1 (a convex combination of v in (-1, 1)), so the same bounds
// serve as absolute limits per element, doubled.
static double tolerance(dda_dtype t) { return t == DDA_F32 ? 1e-5 : t == DDA_F16 ? 2e-3 : 1.5e-2; }
static double lse_tolerance() { return 1e-4; }  // lse is fp32 in every dtype: same inputs

enum MaskMode { M_NONE, M_ADD_F32_KEY, M_BOOL_ROWS, M_ADD_F16_FULL, M_ADD_BF16_QK, M_COUNT };
static const char *mask_name(int m) {
  static const char *n[] = {"none", "add-f32[B,1,1,Sk]", "bool[B,1,Sq,Sk]", "add-f16[B,H,Sq,Sk]",
                            "add-bf16[1,1,Sq,Sk]"};
  return n[m];
}

struct Case {
  int B, H, Sq, Sk, D;
  bool cross;   // q [B,Sq,H,D] + kv [B,Sk,2,H,D]; else packed qkv [B,S,3,H,D] (Sq == Sk)
  int mask;     // MaskMode
  bool lse;
  bool misalign;  // every tensor starts 2 elements past a 16-byte boundary
};

static int g_failures = 0;
static int g_skipped = 0;
static dda_attention_backend g_backend = DDA_ATTN_AUTO;  // --backend

// Host-side copy of one case: fp32 inputs (exact in every dtype) and the mask.
struct Inputs {
  std::vector<float> qbuf, kvbuf;  // kvbuf empty for self-attention (k, v inside qbuf)
  std::vector<unsigned char> mask;
  dda_mask_kind mask_kind = DDA_MASK_NONE;
  int64_t ms[4] = {0, 0, 0, 0};    // mask strides b, h, q, k
  int64_t mis = 0;
  int64_t q_off = 0, k_off = 0, v_off = 0;  // element offsets of q, k, v in their buffers
  int64_t qs[3], ks[3];                     // strides b, s, h (v has k's)
  int64_t os[3];
  size_t o_elems = 0;
};

static Inputs make_inputs(const Case &c, Rng &rng) {
  Inputs in;
  const int64_t HD = (int64_t)c.H * c.D;
  in.mis = c.misalign ? 2 : 0;
  if (c.cross) {
    in.qbuf.resize((size_t)(in.mis + (int64_t)c.B * c.Sq * HD));
    in.kvbuf.resize((size_t)(in.mis + (int64_t)c.B * c.Sk * 2 * HD));
    in.q_off = in.mis;
    in.k_off = in.mis;
    in.v_off = in.mis + HD;
    in.qs[0] = (int64_t)c.Sq * HD; in.qs[1] = HD; in.qs[2] = c.D;
    in.ks[0] = (int64_t)c.Sk * 2 * HD; in.ks[1] = 2 * HD; in.ks[2] = c.D;
  } else {
    in.qbuf.resize((size_t)(in.mis + (int64_t)c.B * c.Sq * 3 * HD));
    in.q_off = in.mis;
    in.k_off = in.mis + HD;
    in.v_off = in.mis + 2 * HD;
    in.qs[0] = (int64_t)c.Sq * 3 * HD; in.qs[1] = 3 * HD; in.qs[2] = c.D;
    in.ks[0] = in.qs[0]; in.ks[1] = in.qs[1]; in.ks[2] = in.qs[2];
  }
  for (float &x : in.qbuf) x = rng.grid();
  for (float &x : in.kvbuf) x = rng.grid();
  // o: [B, Sq, H, D] with 8 elements of padding after each row of H*D.
  in.os[2] = c.D; in.os[1] = HD + 8; in.os[0] = (int64_t)c.Sq * (HD + 8);
  in.o_elems = (size_t)(in.mis + (int64_t)c.B * c.Sq * (HD + 8));

  const int64_t B = c.B, H = c.H, Sq = c.Sq, Sk = c.Sk;
  switch (c.mask) {
    case M_ADD_F32_KEY: {  // [B,1,1,Sk], values in [-4, 0], every 7th key -inf
      in.mask_kind = DDA_MASK_ADD_F32;
      in.ms[0] = Sk; in.ms[1] = 0; in.ms[2] = 0; in.ms[3] = 1;
      std::vector<float> m((size_t)(B * Sk));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < Sk; ++j)
          m[b * Sk + j] = j % 7 == 3 ? -INFINITY : -(float)rng.below(65) / 16.0f;
      in.mask = convert(m, DDA_F32);
      break;
    }
    case M_BOOL_ROWS: {  // [B,1,Sq,Sk], ~30% masked, every 5th row fully masked
      in.mask_kind = DDA_MASK_BOOL;
      in.ms[0] = Sq * Sk; in.ms[1] = 0; in.ms[2] = Sk; in.ms[3] = 1;
      in.mask.resize((size_t)(B * Sq * Sk));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Sq; ++i)
          for (int64_t j = 0; j < Sk; ++j)
            in.mask[(b * Sq + i) * Sk + j] = i % 5 == 2 ? 0 : (rng.below(10) >= 3);
      break;
    }
    case M_ADD_F16_FULL: {  // [B,H,Sq,Sk], values in [-2, 2]
      in.mask_kind = DDA_MASK_ADD_F16;
      in.ms[0] = H * Sq * Sk; in.ms[1] = Sq * Sk; in.ms[2] = Sk; in.ms[3] = 1;
      std::vector<float> m((size_t)(B * H * Sq * Sk));
      for (float &x : m) x = (float)(rng.below(65) - 32) / 16.0f;
      in.mask = convert(m, DDA_F16);
      break;
    }
    case M_ADD_BF16_QK: {  // [1,1,Sq,Sk] broadcast over b and h, values in [-4, 0]
      in.mask_kind = DDA_MASK_ADD_BF16;
      in.ms[0] = 0; in.ms[1] = 0; in.ms[2] = Sk; in.ms[3] = 1;
      std::vector<float> m((size_t)(Sq * Sk));
      for (float &x : m) x = -(float)rng.below(65) / 16.0f;
      in.mask = convert(m, DDA_BF16);
      break;
    }
    default:
      break;
  }
  return in;
}

static dda_attention_params params_for(const Case &c, const Inputs &in, const void *qbase,
                                       const void *kvbase, void *o, float *lse, const void *mask,
                                       dda_dtype t) {
  const size_t es = esize(t);
  dda_attention_params p;
  memset(&p, 0, sizeof(p));
  p.q = (const unsigned char *)qbase + in.q_off * es;
  p.k = (const unsigned char *)kvbase + in.k_off * es;
  p.v = (const unsigned char *)kvbase + in.v_off * es;
  p.o = (unsigned char *)o + in.mis * es;
  p.lse = lse;
  p.mask = mask;
  p.mask_kind = in.mask_kind;
  p.q_stride_b = in.qs[0]; p.q_stride_s = in.qs[1]; p.q_stride_h = in.qs[2];
  p.k_stride_b = in.ks[0]; p.k_stride_s = in.ks[1]; p.k_stride_h = in.ks[2];
  p.v_stride_b = in.ks[0]; p.v_stride_s = in.ks[1]; p.v_stride_h = in.ks[2];
  p.o_stride_b = in.os[0]; p.o_stride_s = in.os[1]; p.o_stride_h = in.os[2];
  p.mask_stride_b = in.ms[0]; p.mask_stride_h = in.ms[1];
  p.mask_stride_q = in.ms[2]; p.mask_stride_k = in.ms[3];
  p.B = c.B; p.H = c.H; p.Sq = c.Sq; p.Sk = c.Sk; p.D = c.D;
  p.scale = 1.0f / sqrtf((float)c.D);
  p.dtype = t;
  return p;
}

// Query rows compared with the reference: all for small Sq, else the edges of the
// 64-row tiles at both ends, the middle and a few random rows, so the naive C
// reference stays fast. Every row is checked for unwritten / non-finite output.
static std::vector<int> checked_rows(int Sq, Rng &rng) {
  std::vector<int> rows;
  if (Sq <= 512) {
    for (int i = 0; i < Sq; ++i) rows.push_back(i);
    return rows;
  }
  const int fixed[] = {0, 1, 2, 7, 31, 32, 63, 64, 65, Sq / 2, Sq - 65, Sq - 64, Sq - 2, Sq - 1};
  for (int i : fixed) rows.push_back(i);
  for (int k = 0; k < 10; ++k) rows.push_back(rng.below(Sq));
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

// fp32 reference of the given rows: ref_o [B, Sq, H, D] and ref_lse [B, H, Sq] at those rows.
static bool reference(const Case &c, const Inputs &in, const std::vector<int> &rows,
                      std::vector<float> &ref_o, std::vector<float> &ref_lse) {
  const int64_t HD = (int64_t)c.H * c.D;
  ref_o.assign((size_t)c.B * c.Sq * HD, 0.0f);
  ref_lse.assign((size_t)c.B * c.H * c.Sq, 0.0f);
  std::vector<float> o1((size_t)(c.B * HD)), lse1((size_t)(c.B * c.H));
  const float *kvbase = c.cross ? in.kvbuf.data() : in.qbuf.data();
  for (int i : rows) {
    // One query row: q, o and the mask start at row i; Sq = 1.
    dda_attention_params p = params_for(c, in, in.qbuf.data(), kvbase, o1.data(), lse1.data(),
                                        in.mask.empty() ? nullptr : in.mask.data(), DDA_F32);
    p.q = in.qbuf.data() + in.q_off + (int64_t)i * in.qs[1];
    p.o = o1.data();
    p.o_stride_b = HD; p.o_stride_s = HD; p.o_stride_h = c.D;
    if (p.mask) {
      const unsigned char *m = (const unsigned char *)p.mask;
      const size_t mes = in.mask_kind == DDA_MASK_BOOL ? 1 : in.mask_kind == DDA_MASK_ADD_F32 ? 4 : 2;
      p.mask = m + (size_t)((int64_t)i * in.ms[2]) * mes;
    }
    p.Sq = 1;
    const dda_status st = dda_attention_fwd_cpu(&p);
    if (st != DDA_OK) {
      printf("FAIL: dda_attention_fwd_cpu: %s\n", dda_status_string(st));
      return false;
    }
    for (int b = 0; b < c.B; ++b)
      for (int64_t e = 0; e < HD; ++e) ref_o[((size_t)b * c.Sq + i) * HD + e] = o1[b * HD + e];
    for (int b = 0; b < c.B; ++b)
      for (int h = 0; h < c.H; ++h) ref_lse[((size_t)b * c.H + h) * c.Sq + i] = lse1[b * c.H + h];
  }
  return true;
}

static void run_case(const Case &c, Rng &rng) {
  const Inputs in = make_inputs(c, rng);
  const std::vector<int> rows = checked_rows(c.Sq, rng);
  std::vector<float> ref_o, ref_lse;
  if (!reference(c, in, rows, ref_o, ref_lse)) {
    ++g_failures;
    return;
  }
  const int64_t HD = (int64_t)c.H * c.D;
  void *dmask = in.mask.empty() ? nullptr : to_device(in.mask.data(), in.mask.size());
  const size_t lse_n = (size_t)c.B * c.H * c.Sq;
  float *dlse = nullptr;
  CUDA_CHECK(cudaMalloc(&dlse, lse_n * sizeof(float)));

  for (int ti = 0; ti < 3; ++ti) {
    const dda_dtype t = (dda_dtype)ti;
    const size_t es = esize(t);
    std::vector<unsigned char> qraw = convert(in.qbuf, t), kvraw = convert(in.kvbuf, t);
    void *dq = to_device(qraw.data(), qraw.size());
    void *dkv = c.cross ? to_device(kvraw.data(), kvraw.size()) : dq;
    void *dout = nullptr;
    CUDA_CHECK(cudaMalloc(&dout, in.o_elems * es));
    CUDA_CHECK(cudaMemset(dout, 0xFF, in.o_elems * es));
    CUDA_CHECK(cudaMemset(dlse, 0xFF, lse_n * sizeof(float)));

    dda_attention_params p = params_for(c, in, dq, dkv, dout, c.lse ? dlse : nullptr, dmask, t);
    p.backend = g_backend;
    if (const char *why = g_backend != DDA_ATTN_AUTO ? dda_attention_supported_cuda(&p) : nullptr) {
      printf("skip %s B=%d H=%d Sq=%d Sk=%d D=%d mask=%s%s: %s\n", dname(t), c.B, c.H, c.Sq, c.Sk, c.D,
             mask_name(c.mask), c.misalign ? " misaligned" : "", why);
      ++g_skipped;
      if (c.cross) CUDA_CHECK(cudaFree(dkv));
      CUDA_CHECK(cudaFree(dq));
      CUDA_CHECK(cudaFree(dout));
      continue;
    }
    const dda_status st = dda_attention_fwd_cuda(&p, 0);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());

    char label[320];
    snprintf(label, sizeof label, "%s B=%d H=%d Sq=%d Sk=%d D=%d %s mask=%s%s%s [%s]", dname(t), c.B, c.H,
             c.Sq, c.Sk, c.D, c.cross ? "cross" : "self", mask_name(c.mask), c.lse ? " lse" : "",
             c.misalign ? " misaligned" : "", dda_attention_kernel_for(&p));
    if (st != DDA_OK) {
      printf("FAIL %s: status %s (backend %d)\n", label, dda_status_string(st), dda_last_backend_error());
      ++g_failures;
    } else {
      std::vector<unsigned char> out(in.o_elems * es);
      std::vector<float> lse(lse_n);
      CUDA_CHECK(cudaMemcpy(out.data(), dout, out.size(), cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(lse.data(), dlse, lse_n * sizeof(float), cudaMemcpyDeviceToHost));

      // Every element of o written and finite; padding and the leading gap still poison.
      bool poison_ok = true, finite_ok = true;
      for (size_t e = 0; e < in.o_elems; ++e) {
        const int64_t off = (int64_t)e - in.mis;
        const bool inside = off >= 0 && off % (HD + 8) < HD;
        if (inside) {
          finite_ok &= std::isfinite(load(out.data(), e, t));
        } else {
          for (size_t k = 0; k < es; ++k) poison_ok &= out[e * es + k] == 0xFF;
        }
      }
      // lse: written for every row (finite, or -inf exactly where the reference is -inf).
      bool lse_ok = true;
      double lse_err = 0.0;
      if (c.lse) {
        for (size_t e = 0; e < lse_n; ++e) lse_ok &= !std::isnan(lse[e]) && lse[e] != INFINITY;
        for (int i : rows)
          for (int bh = 0; bh < c.B * c.H; ++bh) {
            const float g = lse[(size_t)bh * c.Sq + i], r = ref_lse[(size_t)bh * c.Sq + i];
            if (std::isinf(r) || std::isinf(g)) {
              lse_ok &= g == r;
            } else {
              lse_err = std::max(lse_err, fabs((double)g - r) / std::max(1.0, fabs((double)r)));
            }
          }
        lse_ok &= lse_err <= lse_tolerance();
      }

      double err2 = 0.0, ref2 = 0.0, max_abs = 0.0;
      for (int b = 0; b < c.B; ++b)
        for (int i : rows)
          for (int64_t e = 0; e < HD; ++e) {
            const double g = load(out.data(), (size_t)(in.mis + b * in.os[0] + i * in.os[1] + e), t);
            const double r = ref_o[((size_t)b * c.Sq + i) * HD + e];
            const double d = std::isnan(g) ? INFINITY : fabs(g - r);
            err2 += d * d;
            ref2 += r * r;
            max_abs = std::max(max_abs, d);
          }
      const double rel = ref2 > 0.0 ? sqrt(err2 / ref2) : sqrt(err2);
      const bool pass = poison_ok && finite_ok && lse_ok && rel <= tolerance(t) &&
                        max_abs <= 2.0 * tolerance(t);
      printf("%s %s: max_abs=%.3g rel_l2=%.3g (tol %.3g)%s%s%s%s\n", pass ? "ok  " : "FAIL", label,
             max_abs, rel, tolerance(t), poison_ok ? "" : " WROTE-OUTSIDE-O",
             finite_ok ? "" : " UNWRITTEN-OR-NONFINITE", lse_ok ? "" : " LSE-WRONG",
             rows.size() < (size_t)c.Sq ? " (sampled rows)" : "");
      if (c.lse && !lse_ok) printf("     lse max rel err %.3g\n", lse_err);
      if (!pass) ++g_failures;
    }
    if (c.cross) CUDA_CHECK(cudaFree(dkv));
    CUDA_CHECK(cudaFree(dq));
    CUDA_CHECK(cudaFree(dout));
  }
  CUDA_CHECK(cudaFree(dlse));
  if (dmask) CUDA_CHECK(cudaFree(dmask));
}

static void run_small(Rng &rng) {
  // the SD head dims, plus 8 (smallest), 136 and 264 (padded up inside a bucket)
  const int Ds[] = {8, 40, 64, 80, 128, 136, 160, 264, 512};
  const int pairs[][2] = {{1, 1}, {77, 77}, {97, 97}, {257, 257}, {1, 77}, {97, 257}, {257, 1}, {77, 97}};
  int n = 0;
  for (int D : Ds)
    for (const auto &sk : pairs) {
      Case c;
      c.B = 2; c.H = 3; c.Sq = sk[0]; c.Sk = sk[1]; c.D = D;
      c.cross = c.Sq != c.Sk || n % 4 == 3;
      c.mask = n % M_COUNT;
      c.lse = n % 4 != 1;
      c.misalign = n % 6 == 5;
      ++n;
      run_case(c, rng);
    }
}

// Unmasked, aligned cases: the ones the TMA Hopper kernel takes (D 33..48, 49..64,
// 65..80, 113..128), at tile edges (128, 129) and odd sizes.
static void run_unmasked(Rng &rng) {
  const int Ds[] = {40, 48, 56, 64, 72, 80, 120, 128};
  const int pairs[][2] = {{1, 1}, {77, 77}, {128, 128}, {129, 129}, {257, 257}, {1, 77}, {97, 257}, {300, 77}};
  int n = 0;
  for (int D : Ds)
    for (const auto &sk : pairs) {
      Case c = {2, 3, sk[0], sk[1], D, sk[0] != sk[1] || n % 2 == 1, M_NONE, n % 3 != 2, false};
      ++n;
      run_case(c, rng);
    }
}

static void run_big_checks(Rng &rng) {
  //      B  H  Sq    Sk    D    cross  mask            lse   misalign
  const Case cases[] = {
      {1, 2, 4097, 4097, 64, false, M_BOOL_ROWS, true, false},
      {1, 2, 4097, 4097, 40, false, M_NONE, true, false},
      {1, 2, 4097, 4097, 64, false, M_NONE, true, false},
      {1, 2, 4097, 4097, 80, false, M_NONE, false, false},
      {1, 2, 4097, 4097, 128, false, M_NONE, true, false},
      {2, 2, 4097, 77, 80, true, M_ADD_F32_KEY, true, false},
      {1, 2, 77, 4097, 160, true, M_ADD_BF16_QK, true, true},
      {1, 1, 4097, 4097, 512, false, M_NONE, true, false},
  };
  for (const Case &c : cases) run_case(c, rng);
}

// Argument errors are returned before any launch; kernel names are static strings.
static void run_errors() {
  float dummy[8] = {0};
  Case c = {1, 1, 1, 1, 8, false, M_NONE, false, false};
  Inputs in;
  in.q_off = in.k_off = in.v_off = 0;
  for (int k = 0; k < 3; ++k) in.qs[k] = in.ks[k] = in.os[k] = 8;
  dda_attention_params p = params_for(c, in, dummy, dummy, dummy, nullptr, nullptr, DDA_F16);
  p.D = 36;
  if (dda_attention_fwd_cuda(&p, 0) != DDA_ERR_UNSUPPORTED_HEAD_DIM) { printf("FAIL: D=36 accepted\n"); ++g_failures; }
  p.D = 8;
  p.Sk = 0;
  if (dda_attention_fwd_cuda(&p, 0) != DDA_ERR_INVALID_ARGUMENT) { printf("FAIL: Sk=0 accepted\n"); ++g_failures; }
  p.Sk = 1;
  p.mask_kind = DDA_MASK_BOOL;
  if (dda_attention_fwd_cuda(&p, 0) != DDA_ERR_INVALID_ARGUMENT) { printf("FAIL: null mask accepted\n"); ++g_failures; }
  p.D = 8;
  p.mask_kind = DDA_MASK_NONE;
  p.dtype = DDA_F32;
  p.backend = DDA_ATTN_MMA;  // fp32 on a tensor-core family: refused, not run elsewhere
  if (dda_attention_fwd_cuda(&p, 0) != DDA_ERR_UNSUPPORTED || dda_attention_supported_cuda(&p) == nullptr) {
    printf("FAIL: fp32 on the mma backend accepted\n");
    ++g_failures;
  }
  p.backend = DDA_ATTN_AUTO;

  // Grids beyond 2^31 - 1 blocks: refused before any launch (the pointers are never read),
  // with the block count in the reason; auto runs a family whose tiles fit where one does.
  alignas(16) static unsigned char never_read[64];
  dda_attention_params g = p;
  g.q = g.k = g.v = never_read;
  g.o = never_read;
  g.q_stride_b = g.k_stride_b = g.v_stride_b = g.o_stride_b = 64;
  g.q_stride_s = g.k_stride_s = g.v_stride_s = g.o_stride_s = 64;
  g.q_stride_h = g.k_stride_h = g.v_stride_h = g.o_stride_h = 64;
  g.dtype = DDA_F16;
  g.D = 64; g.Sq = 16; g.Sk = 16;
  g.B = 1 << 20; g.H = 1 << 12;  // 2^32 (b, h) pairs: every family needs >= 2^32 blocks
  for (int b = DDA_ATTN_AUTO; b < DDA_ATTN_NUM_BACKENDS; ++b) {
    if (b == DDA_ATTN_REFERENCE) continue;
    g.backend = (dda_attention_backend)b;
    const char *why = dda_attention_supported_cuda(&g);
    const bool grid = why != nullptr && strstr(why, "2147483647") != nullptr;
    const dda_status st = why ? dda_attention_fwd_cuda(&g, 0) : DDA_OK;  // never launched where accepted
    if (why == nullptr || st != (grid ? DDA_ERR_GRID_LIMIT : DDA_ERR_UNSUPPORTED) || (b == DDA_ATTN_AUTO && !grid)) {
      printf("FAIL: B*H = 2^32 on backend %s: status %s, reason \"%s\"\n", dda_attention_backend_name(g.backend),
             dda_status_string(st), why ? why : "(accepted)");
      ++g_failures;
    } else if (b == DDA_ATTN_AUTO) {
      printf("ok   B*H = 2^32 refused: \"%s\"\n", why);
    }
  }
  int dev = 0, major = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major >= 8) {
    // Sq = 64, B * H = 2^30: generic (32-row blocks) needs 2^31 blocks, short (one block of
    // four 16-row tiles per head) 2^30, so auto runs short and a forced generic is refused.
    g.B = 1 << 15; g.H = 1 << 15; g.Sq = 64;
    g.backend = DDA_ATTN_AUTO;
    const char *name = dda_attention_kernel_for(&g);
    g.backend = DDA_ATTN_GENERIC;
    const char *why = dda_attention_supported_cuda(&g);
    const dda_status st = why ? dda_attention_fwd_cuda(&g, 0) : DDA_OK;
    if (strncmp(name, "short_sm80", 10) != 0 || why == nullptr || strstr(why, "2147483647") == nullptr ||
        st != DDA_ERR_GRID_LIMIT) {
      printf("FAIL: B*H = 2^30, Sq = 64: auto runs %s; generic: status %s, reason \"%s\"\n", name,
             dda_status_string(st), why ? why : "(accepted)");
      ++g_failures;
    } else {
      printf("ok   B*H = 2^30, Sq = 64: auto runs %s; generic refused: \"%s\"\n", name, why);
    }
  }

  const char *bad = dda_attention_kernel_name(9, 0, DDA_F16, 36, 77);
  if (strncmp(bad, "unsupported: ", 13) != 0) { printf("FAIL: kernel name for D=36: %s\n", bad); ++g_failures; }
  printf("ok   argument errors; D=36 -> \"%s\"\n", bad);
  printf("     kernel names sm_90: d40 f16 %s, d512 f16 %s, d512 f32 %s; sm_86 d512 f32 %s\n",
         dda_attention_kernel_name(9, 0, DDA_F16, 40, 4096), dda_attention_kernel_name(9, 0, DDA_F16, 512, 4096),
         dda_attention_kernel_name(9, 0, DDA_F32, 512, 4096), dda_attention_kernel_name(8, 6, DDA_F32, 512, 4096));
}

// ------------------------------------------------- many short sequences --
//
// B * H of 70,000 to 300,000 (AnimateDiff's temporal attention over 16 frames; SDXL sizes
// reach 262,144), so the folded grid's (b, h) decode runs far past 65535 and k/v offsets past
// 2^31 elements. q/k/v (gigabytes) are generated on the device from a hash of each element's
// index, so no host copy exists: the C reference of a sampled sequence regenerates its
// inputs from the same hash. Every o and lse element is checked on the device for being
// written (and the row padding for staying poison); the sequences around bh = 65535, the
// first, the last and a few random ones are compared with the reference.

__host__ __device__ inline uint64_t hash64(uint64_t i, uint64_t seed) {
  uint64_t x = (i + seed) * 0x9E3779B97F4A7C15ULL;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ULL;
  return x ^ (x >> 29);
}

// A multiple of 1/256 in (-1, 1) (exact in every dtype, like Rng::grid) from an element index.
__host__ __device__ inline float hashed_value(uint64_t i, uint64_t seed) {
  return (float)((int)(hash64(i, seed) % 511) - 255) / 256.0f;
}

// The additive fp32 key mask [B, 1, 1, Sk] at element i = b * Sk + j: values in [-4, 0],
// every 7th key -inf.
__host__ __device__ inline float hashed_mask(uint64_t i, int Sk, uint64_t seed) {
  if (i % (uint64_t)Sk % 7 == 3) return -INFINITY;
  return -(float)(hash64(i, seed) % 65) / 16.0f;
}

__global__ void fill_hashed(void *dst, size_t n, uint64_t seed, dda_dtype t) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = hashed_value(i, seed);
    if (t == DDA_F32) ((float *)dst)[i] = v;
    else if (t == DDA_F16) ((__half *)dst)[i] = __float2half_rn(v);
    else ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(v);
  }
}

__global__ void fill_hashed_mask(float *dst, size_t n, int Sk, uint64_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    dst[i] = hashed_mask(i, Sk, seed);
}

// counts[0]: o elements inside the rows of H * D that are not finite (unwritten: the poison
// is NaN); counts[1]: row-padding elements no longer the all-ones poison; counts[2]: lse
// entries NaN or +inf (unwritten, or wrong: a row's lse is finite or -inf). o has n elements
// of t in rows of `row`, the first hd of each inside.
__global__ void scan_output(const void *o, dda_dtype t, size_t n, int64_t row, int64_t hd, const float *lse,
                            size_t lse_n, unsigned long long *counts) {
  const int es = t == DDA_F32 ? 4 : 2;
  const uint32_t exp_mask = t == DDA_F32 ? 0x7F800000u : t == DDA_F16 ? 0x7C00u : 0x7F80u;
  unsigned long long nonfinite = 0, clobbered = 0, bad_lse = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t bits = es == 4 ? ((const uint32_t *)o)[i] : ((const uint16_t *)o)[i];
    if ((int64_t)(i % (size_t)row) < hd) nonfinite += (bits & exp_mask) == exp_mask;
    else clobbered += bits != (es == 4 ? 0xFFFFFFFFu : 0xFFFFu);
  }
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; lse && i < lse_n; i += stride)
    bad_lse += isnan(lse[i]) || lse[i] == INFINITY;
  if (nonfinite) atomicAdd(&counts[0], nonfinite);
  if (clobbered) atomicAdd(&counts[1], clobbered);
  if (bad_lse) atomicAdd(&counts[2], bad_lse);
}

struct ManyCase {
  int B, H, Sq, Sk, D;
  bool cross;  // q [B,Sq,H,D] + kv [B,Sk,2,H,D]; else packed qkv [B,S,3,H,D]
  bool mask;   // additive fp32 [B,1,1,Sk]
  bool lse;
};

static void run_many_case(const ManyCase &c, Rng &rng) {
  const int64_t HD = (int64_t)c.H * c.D, BH = (int64_t)c.B * c.H;
  const uint64_t seed_q = 0x51ULL, seed_kv = 0x3c7ULL, seed_m = 0x9e1ULL;
  // Element counts and strides (b, s, h) as run_case lays them out, without misalignment.
  const int64_t q_per_b = (int64_t)c.Sq * (c.cross ? 1 : 3) * HD, kv_per_b = c.cross ? (int64_t)c.Sk * 2 * HD : 0;
  const int64_t qs[3] = {q_per_b, (c.cross ? 1 : 3) * HD, c.D};
  const int64_t ks[3] = {c.cross ? kv_per_b : q_per_b, (c.cross ? 2 : 3) * HD, c.D};
  const int64_t os[3] = {(int64_t)c.Sq * (HD + 8), HD + 8, c.D};
  const size_t q_n = (size_t)(c.B * q_per_b), kv_n = (size_t)(c.B * kv_per_b), o_n = (size_t)(c.B * os[0]);
  const size_t lse_n = (size_t)(BH * c.Sq), mask_n = c.mask ? (size_t)c.B * c.Sk : 0;

  // Sampled (b, h) pairs, checked for every head of their b.
  std::vector<int64_t> bhs = {0, 1, 65534, 65535, 65536, 65537, BH / 2, BH - 2, BH - 1};
  for (int k = 0; k < 4; ++k) bhs.push_back(((int64_t)rng.next() << 20 ^ rng.next()) % BH);
  std::vector<int> bs;
  for (int64_t bh : bhs)
    if (bh >= 0 && bh < BH) bs.push_back((int)(bh / c.H));
  std::sort(bs.begin(), bs.end());
  bs.erase(std::unique(bs.begin(), bs.end()), bs.end());

  // fp32 reference of every sampled b: o [Sq, H, D] and lse [H, Sq] per b.
  std::vector<float> ref_o(bs.size() * (size_t)c.Sq * HD), ref_lse(bs.size() * (size_t)c.H * c.Sq);
  for (size_t n = 0; n < bs.size(); ++n) {
    const int64_t b = bs[n];
    std::vector<float> qb((size_t)q_per_b), kvb((size_t)kv_per_b), mb((size_t)(c.mask ? c.Sk : 0));
    for (int64_t e = 0; e < q_per_b; ++e) qb[e] = hashed_value((uint64_t)(b * q_per_b + e), seed_q);
    for (int64_t e = 0; e < kv_per_b; ++e) kvb[e] = hashed_value((uint64_t)(b * kv_per_b + e), seed_kv);
    for (int j = 0; j < (int)mb.size(); ++j) mb[j] = hashed_mask((uint64_t)(b * c.Sk + j), c.Sk, seed_m);
    const float *kvbase = c.cross ? kvb.data() : qb.data();
    dda_attention_params p;
    memset(&p, 0, sizeof(p));
    p.q = qb.data();
    p.k = kvbase + (c.cross ? 0 : HD);
    p.v = kvbase + (c.cross ? HD : 2 * HD);
    p.o = ref_o.data() + n * (size_t)c.Sq * HD;
    p.lse = ref_lse.data() + n * (size_t)c.H * c.Sq;
    p.mask = c.mask ? mb.data() : nullptr;
    p.mask_kind = c.mask ? DDA_MASK_ADD_F32 : DDA_MASK_NONE;
    p.mask_stride_k = 1;
    p.q_stride_b = qs[0]; p.q_stride_s = qs[1]; p.q_stride_h = qs[2];
    p.k_stride_b = p.v_stride_b = ks[0]; p.k_stride_s = p.v_stride_s = ks[1]; p.k_stride_h = p.v_stride_h = ks[2];
    p.o_stride_b = (int64_t)c.Sq * HD; p.o_stride_s = HD; p.o_stride_h = c.D;
    p.B = 1; p.H = c.H; p.Sq = c.Sq; p.Sk = c.Sk; p.D = c.D;
    p.scale = 1.0f / sqrtf((float)c.D);
    p.dtype = DDA_F32;
    const dda_status st = dda_attention_fwd_cpu(&p);
    if (st != DDA_OK) {
      printf("FAIL: dda_attention_fwd_cpu: %s\n", dda_status_string(st));
      ++g_failures;
      return;
    }
  }

  float *dmask = nullptr, *dlse = nullptr;
  unsigned long long *dcounts = nullptr;
  if (c.mask) {
    CUDA_CHECK(cudaMalloc(&dmask, mask_n * sizeof(float)));
    fill_hashed_mask<<<1024, 256>>>(dmask, mask_n, c.Sk, seed_m);
    CUDA_CHECK(cudaGetLastError());
  }
  if (c.lse) CUDA_CHECK(cudaMalloc(&dlse, lse_n * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&dcounts, 3 * sizeof(unsigned long long)));
  for (int ti = 0; ti < 3; ++ti) {
    const dda_dtype t = (dda_dtype)ti;
    const size_t es = esize(t);
    void *dq = nullptr, *dkv = nullptr, *dout = nullptr;
    CUDA_CHECK(cudaMalloc(&dq, q_n * es));
    fill_hashed<<<4096, 256>>>(dq, q_n, seed_q, t);
    CUDA_CHECK(cudaGetLastError());
    if (c.cross) {
      CUDA_CHECK(cudaMalloc(&dkv, kv_n * es));
      fill_hashed<<<4096, 256>>>(dkv, kv_n, seed_kv, t);
      CUDA_CHECK(cudaGetLastError());
    }
    const unsigned char *kvbase = (const unsigned char *)(c.cross ? dkv : dq);
    CUDA_CHECK(cudaMalloc(&dout, o_n * es));
    CUDA_CHECK(cudaMemset(dout, 0xFF, o_n * es));
    if (dlse) CUDA_CHECK(cudaMemset(dlse, 0xFF, lse_n * sizeof(float)));

    dda_attention_params p;
    memset(&p, 0, sizeof(p));
    p.q = dq;
    p.k = kvbase + (c.cross ? 0 : HD) * es;
    p.v = kvbase + (c.cross ? HD : 2 * HD) * es;
    p.o = dout;
    p.lse = dlse;
    p.mask = dmask;
    p.mask_kind = c.mask ? DDA_MASK_ADD_F32 : DDA_MASK_NONE;
    p.mask_stride_b = c.mask ? c.Sk : 0;
    p.mask_stride_k = 1;
    p.q_stride_b = qs[0]; p.q_stride_s = qs[1]; p.q_stride_h = qs[2];
    p.k_stride_b = p.v_stride_b = ks[0]; p.k_stride_s = p.v_stride_s = ks[1]; p.k_stride_h = p.v_stride_h = ks[2];
    p.o_stride_b = os[0]; p.o_stride_s = os[1]; p.o_stride_h = os[2];
    p.B = c.B; p.H = c.H; p.Sq = c.Sq; p.Sk = c.Sk; p.D = c.D;
    p.scale = 1.0f / sqrtf((float)c.D);
    p.dtype = t;
    p.backend = g_backend;

    char label[320];
    snprintf(label, sizeof label, "%s B=%d H=%d (B*H=%lld) Sq=%d Sk=%d D=%d %s%s%s [%s]", dname(t), c.B, c.H,
             (long long)BH, c.Sq, c.Sk, c.D, c.cross ? "cross" : "self", c.mask ? " mask=add-f32[B,1,1,Sk]" : "",
             c.lse ? " lse" : "", dda_attention_kernel_for(&p));
    if (const char *why = g_backend != DDA_ATTN_AUTO ? dda_attention_supported_cuda(&p) : nullptr) {
      printf("skip %s: %s\n", label, why);
      ++g_skipped;
    } else {
      const dda_status st = dda_attention_fwd_cuda(&p, 0);
      CUDA_CHECK(cudaGetLastError());
      CUDA_CHECK(cudaDeviceSynchronize());
      if (st != DDA_OK) {
        printf("FAIL %s: status %s (backend %d)\n", label, dda_status_string(st), dda_last_backend_error());
        ++g_failures;
      } else {
        unsigned long long counts[3] = {0, 0, 0};
        CUDA_CHECK(cudaMemset(dcounts, 0, sizeof counts));
        scan_output<<<4096, 256>>>(dout, t, o_n, os[1], HD, dlse, dlse ? lse_n : 0, dcounts);
        CUDA_CHECK(cudaGetLastError());
        CUDA_CHECK(cudaMemcpy(counts, dcounts, sizeof counts, cudaMemcpyDeviceToHost));
        double err2 = 0.0, ref2 = 0.0, max_abs = 0.0, lse_err = 0.0;
        bool lse_ok = true, finite_ok = counts[0] == 0;
        std::vector<unsigned char> orow((size_t)os[0] * es);
        std::vector<float> lrow((size_t)c.H * c.Sq);
        for (size_t n = 0; n < bs.size(); ++n) {
          const int64_t b = bs[n];
          CUDA_CHECK(cudaMemcpy(orow.data(), (const unsigned char *)dout + (size_t)(b * os[0]) * es, orow.size(),
                                cudaMemcpyDeviceToHost));
          for (int i = 0; i < c.Sq; ++i)
            for (int64_t e = 0; e < HD; ++e) {
              const double g = load(orow.data(), (size_t)(i * os[1] + e), t);
              const double r = ref_o[(n * c.Sq + i) * (size_t)HD + e];
              const double d = std::isnan(g) ? INFINITY : fabs(g - r);
              finite_ok &= std::isfinite(g);
              err2 += d * d;
              ref2 += r * r;
              max_abs = std::max(max_abs, d);
            }
          if (!dlse) continue;
          CUDA_CHECK(cudaMemcpy(lrow.data(), dlse + (size_t)b * c.H * c.Sq, lrow.size() * sizeof(float),
                                cudaMemcpyDeviceToHost));
          for (size_t e = 0; e < lrow.size(); ++e) {
            const float g = lrow[e], r = ref_lse[n * lrow.size() + e];
            if (std::isinf(r) || std::isinf(g)) lse_ok &= g == r;
            else lse_err = std::max(lse_err, fabs((double)g - r) / std::max(1.0, fabs((double)r)));
          }
        }
        lse_ok &= counts[2] == 0 && lse_err <= lse_tolerance();
        const double rel = ref2 > 0.0 ? sqrt(err2 / ref2) : sqrt(err2);
        const bool pass =
            finite_ok && counts[1] == 0 && lse_ok && rel <= tolerance(t) && max_abs <= 2.0 * tolerance(t);
        printf("%s %s: %zu sequences checked, max_abs=%.3g rel_l2=%.3g (tol %.3g)%s%s%s\n", pass ? "ok  " : "FAIL",
               label, bs.size() * (size_t)c.H, max_abs, rel, tolerance(t),
               finite_ok ? "" : " UNWRITTEN-OR-NONFINITE", counts[1] ? " WROTE-OUTSIDE-O" : "",
               lse_ok ? "" : " LSE-WRONG");
        if (!finite_ok) printf("     o: %llu elements unwritten or non-finite\n", counts[0]);
        if (!lse_ok) printf("     lse: %llu unwritten or +inf/NaN, max rel err %.3g\n", counts[2], lse_err);
        if (!pass) ++g_failures;
      }
    }
    CUDA_CHECK(cudaFree(dq));
    if (dkv) CUDA_CHECK(cudaFree(dkv));
    CUDA_CHECK(cudaFree(dout));
  }
  CUDA_CHECK(cudaFree(dcounts));
  if (dlse) CUDA_CHECK(cudaFree(dlse));
  if (dmask) CUDA_CHECK(cudaFree(dmask));
}

static void run_many(Rng &rng) {
  //  B       H   Sq  Sk   D   cross  mask   lse
  const ManyCase cases[] = {
      {70000,  1, 16, 16,  64, false, false, true},   // B * H = 70,000, all of it in B
      {17500,  4, 16, 16,  40, false, false, true},   // B * H = 70,000 over 4 heads
      {300000, 1, 16, 16,  40, false, false, false},  // B * H = 300,000
      {75000,  4, 16, 16,  64, false, false, true},   // B * H = 300,000, B above 65535
      {26215, 10, 16, 16,  64, false, false, true},   // B * H = 262,150: SDXL's 10 heads
      {70000,  1, 16, 77,  40, true,  true,  true},   // cross, masked, B * H = 70,000
      {75000,  4, 16, 77,  64, true,  false, true},   // cross, k/v offsets past 2^31 elements
      {70000,  1, 16, 160, 64, true,  false, true},   // Sk > 128: the Hopper kernels under auto
      {40000,  2, 100, 100, 64, false, false, true},  // several query tiles per (b, h)
  };
  for (const ManyCase &c : cases) run_many_case(c, rng);
}

// --------------------------------------------------------------- benchmark --

// Median over `iters` samples (after 3 warm-ups) of the time per launch of kReps launches
// between one pair of events: single launches of a microsecond kernel would time the host's
// launch latency (the GPU idles between the first event and the launch), not the kernel.
static void bench(int B, int H, int Sq, int Sk, int D, int iters, int cc_major, int cc_minor) {
  const dda_dtype t = DDA_F16;
  Case c = {B, H, Sq, Sk, D, Sq != Sk, M_NONE, false, false};
  Rng rng{0xbe4c4ULL + (uint64_t)D};
  const Inputs in = make_inputs(c, rng);
  std::vector<unsigned char> qraw = convert(in.qbuf, t), kvraw = convert(in.kvbuf, t);
  void *dq = to_device(qraw.data(), qraw.size());
  void *dkv = c.cross ? to_device(kvraw.data(), kvraw.size()) : dq;
  void *dout = nullptr;
  CUDA_CHECK(cudaMalloc(&dout, in.o_elems * esize(t)));
  dda_attention_params p = params_for(c, in, dq, dkv, dout, nullptr, nullptr, t);
  p.backend = g_backend;
  if (const char *why = dda_attention_supported_cuda(&p)) {
    printf("skip fp16 %dx%dx%dx%d d%d: %s\n", B, H, Sq, Sk, D, why);
    if (c.cross) CUDA_CHECK(cudaFree(dkv));
    CUDA_CHECK(cudaFree(dq));
    CUDA_CHECK(cudaFree(dout));
    return;
  }

  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> ev(2 * (size_t)iters);
  for (cudaEvent_t &e : ev) CUDA_CHECK(cudaEventCreate(&e));
  bool ok = true;
  for (int w = 0; w < 3; ++w) ok &= dda_attention_fwd_cuda(&p, s) == DDA_OK;
  constexpr int kReps = 10;
  for (int k = 0; k < iters; ++k) {
    CUDA_CHECK(cudaEventRecord(ev[2 * k], s));
    for (int r = 0; r < kReps; ++r) ok &= dda_attention_fwd_cuda(&p, s) == DDA_OK;
    CUDA_CHECK(cudaEventRecord(ev[2 * k + 1], s));
  }
  CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<float> ms((size_t)iters);
  for (int k = 0; k < iters; ++k) {
    CUDA_CHECK(cudaEventElapsedTime(&ms[k], ev[2 * k], ev[2 * k + 1]));
    ms[k] /= kReps;
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[(size_t)iters / 2];
  const double flop = 4.0 * B * H * (double)Sq * Sk * D;
  printf("%s fp16 %dx%dx%dx%d d%d %s: %.4f ms  %.2f TFLOP/s  [%s]\n", ok ? "    " : "FAIL", B, H, Sq, Sk, D,
         c.cross ? "cross" : "self ", med, flop / (med * 1e-3) / 1e12, dda_attention_kernel_for(&p));
  (void)cc_major; (void)cc_minor;
  if (!ok) ++g_failures;
  for (cudaEvent_t &e : ev) CUDA_CHECK(cudaEventDestroy(e));
  CUDA_CHECK(cudaStreamDestroy(s));
  if (c.cross) CUDA_CHECK(cudaFree(dkv));
  CUDA_CHECK(cudaFree(dq));
  CUDA_CHECK(cudaFree(dout));
}

int main(int argc, char **argv) {
  bool big = false, unmasked_only = false, many_only = false;
  int iters = 20;
  int one[5] = {0, 0, 0, 0, 0};  // --bench B,H,Sq,Sk,D: time only that shape (for ncu)
  for (int a = 1; a < argc; ++a) {
    if (!strcmp(argv[a], "--big")) big = true;
    else if (!strcmp(argv[a], "--unmasked")) unmasked_only = true;  // only run_unmasked (sanitizer runs)
    else if (!strcmp(argv[a], "--many")) many_only = true;          // only run_many (gigabytes of inputs)
    else if (!strcmp(argv[a], "--iters") && a + 1 < argc) iters = std::max(1, atoi(argv[++a]));
    else if (!strcmp(argv[a], "--backend") && a + 1 < argc) {
      if (dda_attention_backend_from_name(argv[++a], &g_backend) != DDA_OK || g_backend == DDA_ATTN_REFERENCE) {
        fprintf(stderr, "unknown backend %s: auto, generic, mma, short, d512, sm90 or sm90_tma\n", argv[a]);
        return 2;
      }
    }
    else if (!strcmp(argv[a], "--bench") && a + 1 < argc &&
             sscanf(argv[++a], "%d,%d,%d,%d,%d", &one[0], &one[1], &one[2], &one[3], &one[4]) == 5) {
    } else {
      fprintf(stderr, "usage: %s [--big] [--many] [--unmasked] [--iters N] [--bench B,H,Sq,Sk,D] [--backend NAME]\n",
              argv[0]);
      return 2;
    }
  }
  int dev = 0, rt = 0;
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  printf("device: %s (sm_%d%d, %d SMs), CUDA runtime %d, backend %s\n", prop.name, prop.major, prop.minor,
         prop.multiProcessorCount, rt, dda_attention_backend_name(g_backend));

  if (one[0] > 0) {
    bench(one[0], one[1], one[2], one[3], one[4], iters, prop.major, prop.minor);
    return g_failures ? 1 : 0;
  }
  Rng rng{0x5eedULL};
  if (unmasked_only || many_only) {
    if (unmasked_only) run_unmasked(rng);
    if (many_only) run_many(rng);
    printf("%s: %d failure(s), %d skipped\n", g_failures ? "FAILED" : "PASSED", g_failures, g_skipped);
    return g_failures ? 1 : 0;
  }
  run_errors();
  run_small(rng);
  run_unmasked(rng);
  if (big) {
    run_big_checks(rng);
    run_many(rng);
    printf("timing: FLOP = 4*B*H*Sq*Sk*D, median of %d after 3 warm-ups, CUDA events\n", iters);
    bench(2, 8, 4096, 4096, 40, iters, prop.major, prop.minor);
    bench(2, 8, 1024, 1024, 80, iters, prop.major, prop.minor);
    bench(2, 8, 256, 256, 160, iters, prop.major, prop.minor);
    bench(2, 8, 4096, 77, 40, iters, prop.major, prop.minor);
    bench(2, 5, 9216, 9216, 64, iters, prop.major, prop.minor);
    bench(2, 10, 4096, 4096, 64, iters, prop.major, prop.minor);
    bench(2, 20, 1024, 1024, 64, iters, prop.major, prop.minor);
    bench(2, 10, 4096, 77, 64, iters, prop.major, prop.minor);
    bench(2, 20, 1024, 77, 64, iters, prop.major, prop.minor);
    bench(1, 1, 4096, 4096, 512, iters, prop.major, prop.minor);
    bench(2, 16, 8192, 8192, 128, iters, prop.major, prop.minor);
  }
  printf("%s: %d failure(s), %d skipped\n", g_failures ? "FAILED" : "PASSED", g_failures, g_skipped);
  return g_failures ? 1 : 0;
}
