/* low_rank.c: the checks and the C reference of dda_low_rank_accumulate (dda.h).
 *
 *   out[m, col0 + j] += alpha * sum over the target's segments s of f_s * sum_k t[m, r0_s + k] * b_s[j, k]
 *   t [M, R] (row stride t_stride), b_s [n, r_s] contiguous, out [M, N] (row stride out_stride)
 * Storage f32, f16 or bf16 (converted here, round to nearest even); all arithmetic fp32, in
 * the order the CUDA kernel sums the segments (each segment's dot product, times its factor,
 * added to the target's sum; the sum times alpha added to out once).
 */
#include <math.h>
#include <string.h>

#include "dda.h"

/* ------------------------------------------------------------- checks -- */

/* Whether segments a and b form one target (the same columns). */
static int same_target(const dda_low_rank_segment *a, const dda_low_rank_segment *b) {
  return a->col0 == b->col0 && a->n == b->n;
}

/* The reason and the status of one refusal of dda_low_rank_check. */
static const char *low_rank_refusal(const dda_low_rank_params *p, dda_status *st) {
  int i, j;
  *st = DDA_ERR_INVALID_ARGUMENT;
  if (!p) return "a null params pointer";
  if (!p->t || !p->factors || !p->out) return "a null t, factors or out pointer";
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16) {
    *st = DDA_ERR_UNSUPPORTED_DTYPE;
    return "unknown dtype";
  }
  if (p->M < 1 || p->R < 1 || p->N < 1) return "M, R and N must be >= 1";
  if (p->R > 2147483647 || p->N > 2147483647) return "R and N must be at most 2^31 - 1";
  if (p->t_stride < p->R) return "t's row stride is below its row length R";
  if (p->out_stride < p->N) return "out's row stride is below its row length N";
  if (p->num_segments < 1 || p->num_segments > DDA_LOW_RANK_MAX_SEGMENTS)
    return "the number of segments must be between 1 and DDA_LOW_RANK_MAX_SEGMENTS (16)";
  for (i = 0; i < p->num_segments; ++i) {
    const dda_low_rank_segment *s = &p->segments[i];
    if (!s->b) return "a segment with a null b pointer";
    if (s->r0 < 0 || s->r1 <= s->r0 || s->r1 > p->R) return "a segment's ranks must satisfy 0 <= r0 < r1 <= R";
    if (s->col0 < 0 || s->n < 1 || s->col0 > p->N - s->n)
      return "a segment's columns must satisfy n >= 1, 0 <= col0 and col0 + n <= N";
  }
  for (i = 0; i < p->num_segments; ++i)
    for (j = i + 1; j < p->num_segments; ++j) {
      const dda_low_rank_segment *a = &p->segments[i], *b = &p->segments[j];
      if (!same_target(a, b) && a->col0 < b->col0 + b->n && b->col0 < a->col0 + a->n)
        return "two segments cover overlapping columns without being the same target (the same col0 and n)";
    }
  *st = DDA_OK;
  return 0;
}

const char *dda_low_rank_check_reason(const dda_low_rank_params *p) {
  dda_status st;
  return low_rank_refusal(p, &st);
}

dda_status dda_low_rank_check(const dda_low_rank_params *p) {
  dda_status st;
  low_rank_refusal(p, &st);
  return st;
}

/* ------------------------------------------------- 16-bit conversions -- */

static float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t x;
  float f;
  if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
    f = (float)mant * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  x = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112u) << 23) | (mant << 13);
  memcpy(&f, &x, 4);
  return f;
}

static uint16_t f32_to_f16(float f) {
  uint32_t x, ax, sign, h, rem;
  memcpy(&x, &f, 4);
  sign = (x >> 16) & 0x8000u;
  ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u)); /* NaN, inf */
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds beyond 65504 */
  if (ax < 0x38800000u) /* below 2^-14: a subnormal half, in units of 2^-24 (exact scaling) */
    return (uint16_t)(sign | (uint32_t)rintf(fabsf(f) * 16777216.0f));
  h = (ax - 0x38000000u) >> 13; /* exponent rebiased from 127 to 15, 10 mantissa bits */
  rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(sign | h);
}

static float bf16_to_f32(uint16_t h) {
  const uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

static float load(const void *base, int64_t i, dda_dtype dt) {
  if (dt == DDA_F32) return ((const float *)base)[i];
  if (dt == DDA_F16) return f16_to_f32(((const uint16_t *)base)[i]);
  return bf16_to_f32(((const uint16_t *)base)[i]);
}

static void store(void *base, int64_t i, dda_dtype dt, float v) {
  if (dt == DDA_F32) ((float *)base)[i] = v;
  else if (dt == DDA_F16) ((uint16_t *)base)[i] = f32_to_f16(v);
  else ((uint16_t *)base)[i] = f32_to_bf16(v);
}

/* ---------------------------------------------------------- reference -- */

dda_status dda_low_rank_accumulate_cpu(const dda_low_rank_params *p) {
  const dda_status st = dda_low_rank_check(p);
  const int ns = p ? p->num_segments : 0;
  int64_t m, j, k;
  int s, u, v;
  if (st != DDA_OK) return st;
  for (m = 0; m < p->M; ++m) {
    const int64_t trow = m * p->t_stride, orow = m * p->out_stride;
    for (s = 0; s < ns; ++s) {
      const dda_low_rank_segment *sg = &p->segments[s];
      int first = 1;
      for (u = 0; u < s; ++u) first = first && !same_target(&p->segments[u], sg);
      if (!first) continue; /* its target was done with the first segment that has it */
      for (j = 0; j < sg->n; ++j) {
        float acc = 0.0f;
        int any = 0;
        for (v = s; v < ns; ++v) {
          const dda_low_rank_segment *sv = &p->segments[v];
          const int64_t r = sv->r1 - sv->r0;
          const float f = p->factors[sv->r0];
          float part = 0.0f;
          if (!same_target(sv, sg) || f == 0.0f) continue;
          any = 1;
          for (k = 0; k < r; ++k) part += load(p->t, trow + sv->r0 + k, p->dtype) * load(sv->b, j * r + k, p->dtype);
          acc += f * part;
        }
        if (any) {
          const int64_t o = orow + sg->col0 + j;
          store(p->out, o, p->dtype, load(p->out, o, p->dtype) + p->alpha * acc);
        }
      }
    }
  }
  return DDA_OK;
}
