/* check.c: argument checks shared by the CPU and CUDA backends.
 * They look only at the params (sizes, strides, pointers), never at memory. */
#include "dda.h"

dda_status dda_linear_check(const dda_linear_params *p) {
  if (!p || !p->x || !p->w || !p->y) return DDA_ERR_INVALID_ARGUMENT;
  if (p->M < 1 || p->N < 1 || p->K < 1) return DDA_ERR_INVALID_ARGUMENT;
  if (p->x_stride_m < p->K || p->y_stride_m < p->N) return DDA_ERR_INVALID_ARGUMENT;
  if (p->residual && p->residual_stride_m < p->N) return DDA_ERR_INVALID_ARGUMENT;
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16)
    return DDA_ERR_UNSUPPORTED_DTYPE;
  return DDA_OK;
}

dda_status dda_attention_check(const dda_attention_params *p) {
  if (!p || !p->q || !p->k || !p->v || !p->o) return DDA_ERR_INVALID_ARGUMENT;
  if (p->B < 1 || p->H < 1 || p->Sq < 1 || p->Sk < 1) return DDA_ERR_INVALID_ARGUMENT;
  if (p->D < 8 || p->D > 512 || p->D % 8 != 0) return DDA_ERR_UNSUPPORTED_HEAD_DIM;
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16)
    return DDA_ERR_UNSUPPORTED_DTYPE;
  if (p->q_stride_s < 0 || p->q_stride_h < 0 || p->q_stride_b < 0 || p->k_stride_s < 0 ||
      p->k_stride_h < 0 || p->k_stride_b < 0 || p->v_stride_s < 0 || p->v_stride_h < 0 ||
      p->v_stride_b < 0 || p->o_stride_s < 0 || p->o_stride_h < 0 || p->o_stride_b < 0)
    return DDA_ERR_INVALID_ARGUMENT;
  if (p->mask_kind < DDA_MASK_NONE || p->mask_kind > DDA_MASK_ADD_BF16) return DDA_ERR_INVALID_ARGUMENT;
  if (p->mask_kind != DDA_MASK_NONE) {
    if (!p->mask) return DDA_ERR_INVALID_ARGUMENT;
    if (p->mask_stride_b < 0 || p->mask_stride_h < 0 || p->mask_stride_q < 0 || p->mask_stride_k < 0)
      return DDA_ERR_INVALID_ARGUMENT;
  }
  return DDA_OK;
}

dda_status dda_geglu_check(const dda_geglu_params *p) {
  if (!p || !p->x || !p->y) return DDA_ERR_INVALID_ARGUMENT;
  if (p->M < 1 || p->N < 1) return DDA_ERR_INVALID_ARGUMENT;
  if (p->x_stride_m < 2 * p->N || p->y_stride_m < p->N) return DDA_ERR_INVALID_ARGUMENT;
  if (p->approximate != 0 && p->approximate != 1) return DDA_ERR_INVALID_ARGUMENT;
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16) return DDA_ERR_UNSUPPORTED_DTYPE;
  return DDA_OK;
}

dda_status dda_group_norm_check(const dda_group_norm_params *p) {
  if (!p || !p->x || !p->y) return DDA_ERR_INVALID_ARGUMENT;
  if (p->N < 1 || p->HW < 1 || p->C < 1 || p->G < 1 || p->C % p->G != 0) return DDA_ERR_INVALID_ARGUMENT;
  if (p->x_stride_n < p->HW * p->C || p->y_stride_n < p->HW * p->C) return DDA_ERR_INVALID_ARGUMENT;
  if (p->shift && p->shift_stride_n != 0 && p->shift_stride_n < p->C) return DDA_ERR_INVALID_ARGUMENT;
  if (!(p->eps >= 0.0f) || (p->silu != 0 && p->silu != 1)) return DDA_ERR_INVALID_ARGUMENT;
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16) return DDA_ERR_UNSUPPORTED_DTYPE;
  return DDA_OK;
}
