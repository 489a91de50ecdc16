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
 */
#include <math.h>
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

dda_status dda_attention_fwd_cpu(const dda_attention_params *p) {
  dda_status st = dda_attention_check(p);
  if (st != DDA_OK) return st;
  if (p->dtype != DDA_F32) return DDA_ERR_UNSUPPORTED_DTYPE;
  if (p->backend != DDA_ATTN_AUTO && p->backend != DDA_ATTN_REFERENCE) return DDA_ERR_UNSUPPORTED;
  const int D = p->D;
  float *acc = (float *)malloc(sizeof(float) * (size_t)D * 2);
  float *s = (float *)malloc(sizeof(float) * DDA_ATTN_KEY_BLOCK);
  if (!acc || !s) {
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
      for (int i = 0; i < p->Sq; ++i) {
        const float *q = qb + b * p->q_stride_b + i * p->q_stride_s + h * p->q_stride_h;
        const int64_t mrow = b * p->mask_stride_b + h * p->mask_stride_h + i * p->mask_stride_q;
        float m = -INFINITY, l = 0.0f;
        for (int d = 0; d < D; ++d) acc[d] = 0.0f;
        for (int j0 = 0; j0 < p->Sk; j0 += DDA_ATTN_KEY_BLOCK) {
          const int nj = p->Sk - j0 < DDA_ATTN_KEY_BLOCK ? p->Sk - j0 : DDA_ATTN_KEY_BLOCK;
          float bmax = -INFINITY;
          for (int jj = 0; jj < nj; ++jj) {
            const int j = j0 + jj;
            const float *k = kb + b * p->k_stride_b + j * p->k_stride_s + h * p->k_stride_h;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += q[d] * k[d];
            float sc = dot * p->scale;
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
            const float *v = vb + b * p->v_stride_b + (j0 + jj) * p->v_stride_s + h * p->v_stride_h;
            bl += pj;
            for (int d = 0; d < D; ++d) bacc[d] += pj * v[d];
          }
          l = l * corr + bl;
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + bacc[d];
          m = m_new;
        }
        float *o = ob + b * p->o_stride_b + i * p->o_stride_s + h * p->o_stride_h;
        const float inv = l > 0.0f ? 1.0f / l : l == 0.0f ? 0.0f : l; /* NaN l: o NaN */
        for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
        if (p->lse) p->lse[((int64_t)b * p->H + h) * p->Sq + i] = l > 0.0f ? m + logf(l) : l == 0.0f ? -INFINITY : l;
      }
    }
  }
  free(acc);
  free(s);
  return DDA_OK;
}
