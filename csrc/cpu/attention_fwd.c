/* attention_fwd.c: CPU reference of dda_attention_fwd, fp32.
 *
 * q [B, Sq, H, D], k/v [B, Sk, H, D], o [B, Sq, H, D]: element strides per (b, s, h), D contiguous.
 * lse [B, H, Sq] fp32 contiguous (optional). mask broadcast to [B, H, Sq, Sk] by its strides.
 *
 * Same algorithm as the GPU kernels: keys in blocks of DDA_ATTN_KEY_BLOCK, an online
 * softmax (running max m, running sum l, rescaled accumulator), fp32 throughout, so
 * the two agree up to summation order. Each block's P.V is summed on its own before it is
 * added to the running accumulator, which keeps the sum's rounding error near that of a
 * pairwise sum at long key lengths. A row with every key masked gives o = 0, lse = -inf.
 * NaN propagates as in torch: a NaN score (from q, k, the mask or the scale) makes its whole
 * row NaN, o and lse; a row whose scores are all NaN is not taken for a masked one.
 *
 * The 8-bit precisions (dda.h, dda_attention_precision) quantize each (b, h) first: Q and
 * the smoothed K per token on the int8 grid, and for FP8 V per DDA_ATTN_V_BLOCK keys on the
 * e4m3 grid; the scores are exact integer dot products times the scales, and FP8 rounds each
 * p to e4m3 before it multiplies v, walking the keys in blocks of DDA_ATTN_V_BLOCK. Everything
 * else is the exact path's arithmetic.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dda.h"

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31;
  int32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);         /* inf / nan */
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;                                     /* zero */
    } else {                                           /* subnormal: normalise */
      exp = 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      mant &= 0x3ff;
      bits = sign | (uint32_t)(exp + 127 - 15) << 23 | (mant << 13);
    }
  } else {
    bits = sign | (uint32_t)(exp + 127 - 15) << 23 | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static float bf16_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* The additive bias for one score; -INFINITY for a masked-out key. */
static float mask_value(const dda_attention_params *p, int64_t off) {
  switch (p->mask_kind) {
    case DDA_MASK_BOOL: return ((const uint8_t *)p->mask)[off] ? 0.0f : -INFINITY;
    case DDA_MASK_ADD_F32: return ((const float *)p->mask)[off];
    case DDA_MASK_ADD_F16: return half_to_float(((const uint16_t *)p->mask)[off]);
    case DDA_MASK_ADD_BF16: return bf16_to_float(((const uint16_t *)p->mask)[off]);
    default: return 0.0f;
  }
}

/* x rounded to the nearest e4m3 (FN) value, ties to even, saturating at +-448; NaN stays NaN. */
static float round_e4m3(float x) {
  if (isnan(x)) return x;
  const float a = fabsf(x);
  float r;
  if (a >= 448.0f) {
    r = 448.0f;
  } else if (a < 0.015625f) { /* below 2^-6: the subnormals, steps of 2^-9 */
    r = rintf(a * 512.0f) / 512.0f;
  } else { /* 3 mantissa bits: steps of 2^(e - 3) for a in [2^e, 2^(e + 1)) */
    int e2;
    frexpf(a, &e2); /* a = m 2^e2, m in [0.5, 1): e = e2 - 1 */
    r = ldexpf(rintf(ldexpf(a, 4 - e2)), e2 - 4);
  }
  return copysignf(r, x);
}

/* max |x - mu| over `rows` rows of D elements (row stride `stride`; mu NULL for 0): NaN when an
 * element is not finite, 0 when the max is below DDA_ATTN_QUANT_MIN (quantized as all zero). */
static float quant_amax(const float *x, int rows, int64_t stride, int D, const float *mu) {
  float a = 0.0f;
  int finite = 1;
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < D; ++d) {
      const float y = mu ? x[r * stride + d] - mu[d] : x[r * stride + d];
      finite &= isfinite(y) != 0;
      if (fabsf(y) > a) a = fabsf(y);
    }
  return !finite ? NAN : a < DDA_ATTN_QUANT_MIN ? 0.0f : a;
}

/* x[0..D) (minus mu, if given) on the symmetric int8 grid into x8; returns the
 * dequantization scale max|x| / 127: 0 for a row whose max |x| is below DDA_ATTN_QUANT_MIN
 * (x8 all 0), NaN when an element is not finite (x8 all 0). */
static float quantize_int8(const float *x, const float *mu, int D, int8_t *x8) {
  const float a = quant_amax(x, 1, 0, D, mu);
  if (!(a > 0.0f)) { /* 0 or NaN */
    memset(x8, 0, (size_t)D);
    return a;
  }
  const float inv = 127.0f / a;
  for (int d = 0; d < D; ++d) {
    float r = rintf((mu ? x[d] - mu[d] : x[d]) * inv);
    r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
    x8[d] = (int8_t)r;
  }
  return a / 127.0f;
}

/* One (b, h)'s quantized inputs (8-bit precisions). */
typedef struct {
  int8_t *q8, *k8;  /* [Sq, D], [Sk, D] */
  float *qs, *ks;   /* per row dequantization scales */
  float *mu;        /* [D] K's channel means */
  float *v8;        /* FP8: [Sk, D] e4m3 values (as floats) */
  float *vs;        /* FP8: [ceil(Sk / DDA_ATTN_V_BLOCK)] scales */
} Quant;

static void quantize_head(const dda_attention_params *p, const float *q0, const float *k0, const float *v0,
                          Quant *w) {
  const int D = p->D;
  for (int i = 0; i < p->Sq; ++i) w->qs[i] = quantize_int8(q0 + i * p->q_stride_s, 0, D, w->q8 + (int64_t)i * D);
  for (int d = 0; d < D; ++d) {
    double sum = 0.0;
    for (int j = 0; j < p->Sk; ++j) sum += k0[j * p->k_stride_s + d];
    w->mu[d] = (float)(sum / p->Sk);
  }
  for (int j = 0; j < p->Sk; ++j) w->ks[j] = quantize_int8(k0 + j * p->k_stride_s, w->mu, D, w->k8 + (int64_t)j * D);
  if (p->precision != DDA_PRECISION_FP8) return;
  for (int j0 = 0; j0 < p->Sk; j0 += DDA_ATTN_V_BLOCK) {
    const int nj = p->Sk - j0 < DDA_ATTN_V_BLOCK ? p->Sk - j0 : DDA_ATTN_V_BLOCK;
    const float a = quant_amax(v0 + j0 * p->v_stride_s, nj, p->v_stride_s, D, 0); /* 0: all zero; NaN */
    const float inv = a > 0.0f ? 448.0f / a : 0.0f;
    w->vs[j0 / DDA_ATTN_V_BLOCK] = a / 448.0f;
    for (int j = j0; j < j0 + nj; ++j)
      for (int d = 0; d < D; ++d) w->v8[(int64_t)j * D + d] = a > 0.0f ? round_e4m3(v0[j * p->v_stride_s + d] * inv) : 0.0f;
  }
}

static void free_quant(Quant *w) {
  free(w->q8);
  free(w->k8);
  free(w->qs);
  free(w->ks);
  free(w->mu);
  free(w->v8);
  free(w->vs);
}

static int alloc_quant(const dda_attention_params *p, Quant *w) {
  memset(w, 0, sizeof *w);
  if (p->precision == DDA_PRECISION_EXACT) return 1;
  const size_t D = (size_t)p->D, Sq = (size_t)p->Sq, Sk = (size_t)p->Sk;
  w->q8 = (int8_t *)malloc(Sq * D);
  w->k8 = (int8_t *)malloc(Sk * D);
  w->qs = (float *)malloc(sizeof(float) * Sq);
  w->ks = (float *)malloc(sizeof(float) * Sk);
  w->mu = (float *)malloc(sizeof(float) * D);
  int ok = w->q8 && w->k8 && w->qs && w->ks && w->mu;
  if (p->precision == DDA_PRECISION_FP8) {
    w->v8 = (float *)malloc(sizeof(float) * Sk * D);
    w->vs = (float *)malloc(sizeof(float) * ((Sk + DDA_ATTN_V_BLOCK - 1) / DDA_ATTN_V_BLOCK));
    ok = ok && w->v8 && w->vs;
  }
  if (!ok) free_quant(w);
  return ok;
}

dda_status dda_attention_fwd_cpu(const dda_attention_params *p) {
  dda_status st = dda_attention_check(p);
  if (st != DDA_OK) return st;
  if (p->dtype != DDA_F32) return DDA_ERR_UNSUPPORTED_DTYPE;
  if (p->backend != DDA_ATTN_AUTO && p->backend != DDA_ATTN_REFERENCE) return DDA_ERR_UNSUPPORTED;
  const int D = p->D;
  const int quant = p->precision != DDA_PRECISION_EXACT, fp8 = p->precision == DDA_PRECISION_FP8;
  float *acc = (float *)malloc(sizeof(float) * (size_t)D * 2);
  /* FP8 walks the keys in its v blocks: p is rounded against the running max of its block */
  const int kblock = fp8 ? DDA_ATTN_V_BLOCK : DDA_ATTN_KEY_BLOCK;
  float *s = (float *)malloc(sizeof(float) * (size_t)kblock);
  Quant w;
  if (!acc || !s || !alloc_quant(p, &w)) {
    free(acc);
    free(s);
    return DDA_ERR_OUT_OF_MEMORY;
  }
  float *bacc = acc + D; /* one block's P.V */
  const float *qb = (const float *)p->q;
  const float *kb = (const float *)p->k;
  const float *vb = (const float *)p->v;
  float *ob = (float *)p->o;
  for (int b = 0; b < p->B; ++b) {
    for (int h = 0; h < p->H; ++h) {
      const float *kh = kb + b * p->k_stride_b + h * p->k_stride_h;
      const float *vh = vb + b * p->v_stride_b + h * p->v_stride_h;
      if (quant) quantize_head(p, qb + b * p->q_stride_b + h * p->q_stride_h, kh, vh, &w);
      for (int i = 0; i < p->Sq; ++i) {
        const float *q = qb + b * p->q_stride_b + i * p->q_stride_s + h * p->q_stride_h;
        const int64_t mrow = b * p->mask_stride_b + h * p->mask_stride_h + i * p->mask_stride_q;
        const float qss = quant ? w.qs[i] * p->scale : 0.0f;
        const int8_t *q8 = quant ? w.q8 + (int64_t)i * D : 0;
        float m = -INFINITY, l = 0.0f;
        for (int d = 0; d < D; ++d) acc[d] = 0.0f;
        for (int j0 = 0; j0 < p->Sk; j0 += kblock) {
          const int nj = p->Sk - j0 < kblock ? p->Sk - j0 : kblock;
          float bmax = -INFINITY;
          for (int jj = 0; jj < nj; ++jj) {
            const int j = j0 + jj;
            float sc;
            if (quant) {
              const int8_t *k8 = w.k8 + (int64_t)j * D;
              int32_t dot = 0;
              for (int d = 0; d < D; ++d) dot += (int32_t)q8[d] * (int32_t)k8[d];
              sc = (float)dot * w.ks[j] * qss;
            } else {
              const float *k = kh + j * p->k_stride_s;
              float dot = 0.0f;
              for (int d = 0; d < D; ++d) dot += q[d] * k[d];
              sc = dot * p->scale;
            }
            if (p->mask_kind != DDA_MASK_NONE) sc += mask_value(p, mrow + j * p->mask_stride_k);
            s[jj] = sc;
            if (sc > bmax) bmax = sc;
          }
          const float m_new = bmax > m ? bmax : m;
          /* Every key so far masked out: exponentials against 0 keep masked keys at 0 and
           * NaN scores NaN (fmax-style maxima never hold NaN, so a NaN row's max is -inf). */
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;
          const float corr = m == -INFINITY ? 0.0f : expf(m - m_use);
          float bl = 0.0f;
          for (int d = 0; d < D; ++d) bacc[d] = 0.0f;
          for (int jj = 0; jj < nj; ++jj) {
            const float pj = expf(s[jj] - m_use);
            bl += pj;
            if (fp8) {
              const float p8 = round_e4m3(448.0f * pj);
              const float *v8 = w.v8 + (int64_t)(j0 + jj) * D;
              for (int d = 0; d < D; ++d) bacc[d] += p8 * v8[d];
            } else {
              const float *v = vh + (j0 + jj) * p->v_stride_s;
              for (int d = 0; d < D; ++d) bacc[d] += pj * v[d];
            }
          }
          if (fp8) {
            const float vscale = w.vs[j0 / DDA_ATTN_V_BLOCK] / 448.0f;
            for (int d = 0; d < D; ++d) bacc[d] *= vscale;
          }
          l = l * corr + bl;
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + bacc[d];
          m = m_new;
        }
        float *o = ob + b * p->o_stride_b + i * p->o_stride_s + h * p->o_stride_h;
        const float inv = l > 0.0f ? 1.0f / l : l == 0.0f ? 0.0f : l; /* NaN l: o NaN */
        for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
        if (p->lse) {
          /* 8-bit: the smoothed scores are the scores minus scale (q . mu); lse gives it back */
          float shift = 0.0f;
          if (quant) {
            for (int d = 0; d < D; ++d) shift += q[d] * w.mu[d];
            shift *= p->scale;
          }
          p->lse[((int64_t)b * p->H + h) * p->Sq + i] = l > 0.0f ? m + logf(l) + shift : l == 0.0f ? -INFINITY : l;
        }
      }
    }
  }
  free_quant(&w);
  free(acc);
  free(s);
  return DDA_OK;
}
