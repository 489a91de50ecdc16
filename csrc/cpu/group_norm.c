/* group_norm.c: CPU reference of dda_group_norm, fp32 data, double statistics.
 *
 *   x, y [N, HW, C] channels-last (pixel stride C, sample strides x_stride_n, y_stride_n)
 *   x' = x + shift[n, c] (shift NULL: x' = x)
 *   per (sample n, group g of C / G channels): mean, biased variance of x' over HW * C / G values
 *   y = (x' - mean) / sqrt(var + eps) * gamma[c] + beta[c]; then y * sigmoid(y) if silu
 * Two passes (mean, then the centred sum of squares), in double.
 */
#include <math.h>

#include "dda.h"

dda_status dda_group_norm_cpu(const dda_group_norm_params *p) {
  dda_status st = dda_group_norm_check(p);
  if (st != DDA_OK) return st;
  if (p->dtype != DDA_F32) return DDA_ERR_UNSUPPORTED_DTYPE;
  const float *gamma = (const float *)p->gamma, *beta = (const float *)p->beta;
  const int64_t cpg = p->C / p->G;
  for (int64_t n = 0; n < p->N; ++n) {
    const float *x = (const float *)p->x + n * p->x_stride_n;
    float *y = (float *)p->y + n * p->y_stride_n;
    const float *t = p->shift ? (const float *)p->shift + n * p->shift_stride_n : NULL;
    for (int g = 0; g < p->G; ++g) {
      const int64_t c0 = g * cpg;
      double sum = 0.0, sq = 0.0;
      for (int64_t i = 0; i < p->HW; ++i)
        for (int64_t c = c0; c < c0 + cpg; ++c) sum += (double)x[i * p->C + c] + (t ? t[c] : 0.0);
      const double mean = sum / (double)(p->HW * cpg);
      for (int64_t i = 0; i < p->HW; ++i)
        for (int64_t c = c0; c < c0 + cpg; ++c) {
          const double d = (double)x[i * p->C + c] + (t ? t[c] : 0.0) - mean;
          sq += d * d;
        }
      const double rstd = 1.0 / sqrt(sq / (double)(p->HW * cpg) + (double)p->eps);
      for (int64_t i = 0; i < p->HW; ++i)
        for (int64_t c = c0; c < c0 + cpg; ++c) {
          double v = ((double)x[i * p->C + c] + (t ? t[c] : 0.0) - mean) * rstd;
          if (gamma) v *= gamma[c];
          if (beta) v += beta[c];
          if (p->silu) v = v / (1.0 + exp(-v));
          y[i * p->C + c] = (float)v;
        }
    }
  }
  return DDA_OK;
}
