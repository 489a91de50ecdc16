/* check.c: argument checks shared by the CPU and CUDA backends.
 * They look only at the params (sizes, strides, pointers), never at memory. */
#include <string.h>

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

/* The reason and the status of one refusal of dda_attention_check. */
static const char *attention_refusal(const dda_attention_params *p, dda_status *st) {
  *st = DDA_ERR_INVALID_ARGUMENT;
  if (!p || !p->q || !p->k || !p->v || !p->o) return "a null q, k, v or o pointer";
  if (p->B < 1 || p->H < 1 || p->Sq < 1 || p->Sk < 1) return "B, H, Sq and Sk must be >= 1";
  if (p->D < 8 || p->D > 512 || p->D % 8 != 0) {
    *st = DDA_ERR_UNSUPPORTED_HEAD_DIM;
    return "head dim must be a multiple of 8 in [8, 512]";
  }
  if (p->dtype != DDA_F32 && p->dtype != DDA_F16 && p->dtype != DDA_BF16) {
    *st = DDA_ERR_UNSUPPORTED_DTYPE;
    return "unknown dtype";
  }
  if (p->q_stride_s < 0 || p->q_stride_h < 0 || p->q_stride_b < 0 || p->k_stride_s < 0 ||
      p->k_stride_h < 0 || p->k_stride_b < 0 || p->v_stride_s < 0 || p->v_stride_h < 0 ||
      p->v_stride_b < 0 || p->o_stride_s < 0 || p->o_stride_h < 0 || p->o_stride_b < 0)
    return "a negative q, k, v or o stride";
  if (p->mask_kind < DDA_MASK_NONE || p->mask_kind > DDA_MASK_ADD_BF16) return "unknown mask kind";
  if (p->mask_kind != DDA_MASK_NONE) {
    if (!p->mask) return "a mask kind with a null mask pointer";
    if (p->mask_stride_b < 0 || p->mask_stride_h < 0 || p->mask_stride_q < 0 || p->mask_stride_k < 0)
      return "a negative mask stride";
  }
  if (p->backend < DDA_ATTN_AUTO || p->backend >= DDA_ATTN_NUM_BACKENDS) return "unknown backend";
  if (p->precision < DDA_PRECISION_EXACT || p->precision >= DDA_PRECISION_NUM) return "unknown precision";
  *st = DDA_OK;
  return 0;
}

dda_status dda_attention_check(const dda_attention_params *p) {
  dda_status st;
  attention_refusal(p, &st);
  return st;
}

const char *dda_attention_check_reason(const dda_attention_params *p) {
  dda_status st;
  return attention_refusal(p, &st);
}

const char *dda_attention_supported_cpu(const dda_attention_params *p) {
  const char *why = dda_attention_check_reason(p);
  if (why) return why;
  if (p->dtype != DDA_F32) return "the CPU reference supports float32 only";
  if (p->backend != DDA_ATTN_AUTO && p->backend != DDA_ATTN_REFERENCE)
    return "CPU tensors run only the C reference (backend \"reference\" or \"auto\"); the other backends are CUDA kernels";
  return 0;
}

/* The index of name in names[0..n), or -1. */
static int name_index(const char *const *names, int n, const char *name) {
  int i;
  for (i = 0; name && i < n; ++i)
    if (strcmp(name, names[i]) == 0) return i;
  return -1;
}

static const char *const kBackendNames[DDA_ATTN_NUM_BACKENDS] = {
    "auto", "reference", "generic", "mma", "short", "d512", "sm90", "sm90_tma"};

const char *dda_attention_backend_name(dda_attention_backend b) {
  return b >= DDA_ATTN_AUTO && b < DDA_ATTN_NUM_BACKENDS ? kBackendNames[b] : 0;
}

dda_status dda_attention_backend_from_name(const char *name, dda_attention_backend *out) {
  const int i = name_index(kBackendNames, DDA_ATTN_NUM_BACKENDS, name);
  if (i < 0 || !out) return DDA_ERR_INVALID_ARGUMENT;
  *out = (dda_attention_backend)i;
  return DDA_OK;
}

static const char *const kPrecisionNames[DDA_PRECISION_NUM] = {"exact", "int8-qk", "fp8"};

const char *dda_attention_precision_name(dda_attention_precision p) {
  return p >= DDA_PRECISION_EXACT && p < DDA_PRECISION_NUM ? kPrecisionNames[p] : 0;
}

dda_status dda_attention_precision_from_name(const char *name, dda_attention_precision *out) {
  const int i = name_index(kPrecisionNames, DDA_PRECISION_NUM, name);
  if (i < 0 || !out) return DDA_ERR_INVALID_ARGUMENT;
  *out = (dda_attention_precision)i;
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

const char *dda_group_norm_supported_cpu(const dda_group_norm_params *p) {
  if (dda_group_norm_check(p) != DDA_OK) return "invalid arguments (null pointer, sizes, groups not dividing C, strides)";
  if (p->dtype != DDA_F32) return "the CPU reference supports float32 only";
  return NULL;
}
