/* geglu.c: CPU reference of dda_geglu, fp32.
 *
 * y[m, n] = x[m, n] * gelu(x[m, N + n])
 *   x [M, 2N] (row stride x_stride_m), y [M, N] (row stride y_stride_m)
 *   gelu(g) = 0.5 g (1 + erf(g / sqrt 2)), or 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
 */
#include <math.h>

#include "dda.h"

dda_status dda_geglu_cpu(const dda_geglu_params *p) {
  dda_status st = dda_geglu_check(p);
  if (st != DDA_OK) return st;
  if (p->dtype != DDA_F32) return DDA_ERR_UNSUPPORTED_DTYPE;
  const float *x = (const float *)p->x;
  float *y = (float *)p->y;
  for (int64_t m = 0; m < p->M; ++m) {
    const float *xr = x + m * p->x_stride_m;
    float *yr = y + m * p->y_stride_m;
    for (int64_t n = 0; n < p->N; ++n) {
      const double g = xr[p->N + n];
      const double gelu = p->approximate
                              ? 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
                              : 0.5 * g * (1.0 + erf(g * 0.7071067811865476));
      yr[n] = (float)((double)xr[n] * gelu);
    }
  }
  return DDA_OK;
}
