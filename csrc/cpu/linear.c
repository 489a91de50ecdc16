/* linear.c: CPU reference of dda_linear, fp32.
 *
 * y[m, n] = alpha * sum_k x[m, k] * w[n, k] + beta * residual[m, n] + bias[n]
 *   x [M, K] (row stride x_stride_m), w [N, K] contiguous, y [M, N] (row stride y_stride_m)
 * Accumulation is fp32, in 8 interleaved partial sums (the order a SIMD unit would use).
 */
#include "dda.h"

dda_status dda_linear_cpu(const dda_linear_params *p) {
  dda_status st = dda_linear_check(p);
  if (st != DDA_OK) return st;
  if (p->dtype != DDA_F32) return DDA_ERR_UNSUPPORTED_DTYPE;
  const float *x = (const float *)p->x;
  const float *w = (const float *)p->w;
  const float *bias = (const float *)p->bias;
  const float *res = (const float *)p->residual;
  float *y = (float *)p->y;
  const int64_t K = p->K;
  for (int64_t m = 0; m < p->M; ++m) {
    const float *xr = x + m * p->x_stride_m;
    for (int64_t n = 0; n < p->N; ++n) {
      const float *wr = w + n * K;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int u = 0; u < 8; ++u) part[u] += xr[k + u] * wr[k + u];
      for (; k < K; ++k) part[0] += xr[k] * wr[k];
      float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      float out = p->alpha * acc;
      if (res) out += p->beta * res[m * p->residual_stride_m + n];
      if (bias) out += bias[n];
      y[m * p->y_stride_m + n] = out;
    }
  }
  return DDA_OK;
}
