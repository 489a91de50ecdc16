/*
 * dda.h: the C ABI of deepspeed_diffusers_attn.
 *
 * Torch-free. Every function takes raw pointers, sizes and element strides
 * (all strides are in elements, not bytes), and returns a dda_status; nothing
 * here prints, allocates behind the caller's back, synchronises, or exits.
 *
 * The three operations of a diffusers attention block:
 *   1. projection:  qkv[M, 3*H*D] = x[M, C] . Wqkv[3*H*D, C]^T (+ b)      (dda_linear)
 *      cross:       q[M, H*D] and kv[Mk, 2*H*D] likewise, on x and context
 *   2. attention:   o[B, Sq, H, D] = softmax(scale * q k^T + mask) v       (dda_attention_fwd)
 *      q/k/v are strided views of the packed projection output
 *      ([B, S, 3, H, D] or [B, Sk, 2, H, D]); nothing is permuted or copied.
 *   3. output:      y[M, C] = alpha * o[M, H*D] . Wo[C, H*D]^T + beta * residual + bias   (dda_linear)
 *
 * Compiled as C and as C++ (torch compiles .c as C++): keep to the common subset.
 */
#ifndef DDA_H
#define DDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Identical to the CUDA runtime's own declaration, so both may be seen. */
typedef struct CUstream_st *cudaStream_t;

typedef enum {
  DDA_F32 = 0,
  DDA_F16 = 1,
  DDA_BF16 = 2
} dda_dtype;

typedef enum {
  DDA_OK = 0,
  DDA_ERR_INVALID_ARGUMENT = 1,   /* a null pointer, a size < 1, a bad stride */
  DDA_ERR_UNSUPPORTED_DTYPE = 2,  /* e.g. fp16 on the CPU reference */
  DDA_ERR_UNSUPPORTED_HEAD_DIM = 3, /* head dim not a multiple of 8, or > 512 */
  DDA_ERR_OUT_OF_MEMORY = 5,      /* host allocation in a CPU reference failed */
  DDA_ERR_CUDA = 6,               /* a CUDA runtime call or a launch failed */
  DDA_ERR_CUBLAS = 7,             /* a cuBLASLt call failed or found no algorithm */
  DDA_ERR_NOT_BUILT = 8,          /* the library was built without CUDA */
  DDA_ERR_UNPLANNED_IN_CAPTURE = 9, /* a GEMM shape first seen during CUDA-graph capture */
  DDA_ERR_UNSUPPORTED = 10,       /* no attention kernel of the requested backend runs these inputs
                                     on this device (dda_attention_supported_cuda says why) */
  DDA_ERR_GRID_LIMIT = 11,        /* the kernel would need more than 2^31 - 1 thread blocks in one launch
                                     (attention: blocks per (b, h) x B x H); dda_attention_supported_cuda gives
                                     the count */
  DDA_ERR_TENSOR_MAP = 12         /* the driver refused a TMA tensor map of q, k or v
                                     (dda_last_backend_error: its CUresult) */
} dda_status;

/* A static, human-readable name for a status. Never NULL. */
const char *dda_status_string(dda_status s);

/* The last CUDA / cuBLAS error code seen by this thread behind DDA_ERR_CUDA or
 * DDA_ERR_CUBLAS (0 if none), so the glue can report it. */
int dda_last_backend_error(void);
/* Internal: the backends record that code here. */
void dda_set_backend_error(int code);

/* ---------------------------------------------------------------- linear --
 * y[m, n] = alpha * sum_k x[m, k] * w[n, k] + beta * residual[m, n] + bias[n]
 *
 *   x        [M, K], row stride x_stride_m, elements contiguous along K
 *   w        [N, K], torch Linear layout ([out, in]), contiguous (stride K)
 *   bias     [N] or NULL
 *   residual [M, N], row stride residual_stride_m, or NULL (then beta is ignored)
 *   y        [M, N], row stride y_stride_m; must not overlap x or w. It may be the
 *            residual itself (in place) only with the same row stride.
 * All of x, w, bias, residual, y have the same dtype. Accumulation is fp32.
 * Note that bias is not scaled by alpha: to get (x.w^T + b + r) / f, pass
 * alpha = beta = 1/f and a bias already divided by f.
 */
typedef struct {
  const void *x;
  const void *w;
  const void *bias;
  const void *residual;
  void *y;
  int64_t x_stride_m;
  int64_t residual_stride_m;
  int64_t y_stride_m;
  int64_t M, N, K;
  float alpha, beta;
  dda_dtype dtype;
} dda_linear_params;

/* ------------------------------------------------------------- attention --
 * Backends: which attention implementation runs. AUTO (0, what a zeroed params
 * struct asks for) lets the dispatcher pick; every other value forces one family,
 * and a family that cannot take the inputs is refused (DDA_ERR_UNSUPPORTED), never
 * replaced by another. REFERENCE is the CPU's C reference; the others are CUDA kernel
 * families. dda_attention_backend_name gives the lowercase names the Python API uses.
 */
typedef enum {
  DDA_ATTN_AUTO = 0,
  DDA_ATTN_REFERENCE = 1, /* "reference": the fp32 C reference (CPU) */
  DDA_ATTN_GENERIC = 2,   /* "generic":   SIMT, any dtype, any alignment */
  DDA_ATTN_MMA = 3,       /* "mma":       mma.sync, sm_80+, fp16/bf16, D <= 256 */
  DDA_ATTN_SHORT = 4,     /* "short":     mma.sync for Sk <= 128, D <= 160 */
  DDA_ATTN_D512 = 5,      /* "d512":      mma.sync for 256 < D <= 512 */
  DDA_ATTN_SM90 = 6,      /* "sm90":      cp.async + wgmma, sm_90a builds on Hopper, D <= 256 */
  DDA_ATTN_SM90_TMA = 7,  /* "sm90_tma":  TMA + warp-specialised wgmma, unmasked, D 33..80, 113..128 */
  DDA_ATTN_NUM_BACKENDS = 8
} dda_attention_backend;

/* "auto", "reference", "generic", ...; NULL for a value out of range. */
const char *dda_attention_backend_name(dda_attention_backend b);
/* The backend of a name; DDA_OK, or DDA_ERR_INVALID_ARGUMENT for an unknown name. */
dda_status dda_attention_backend_from_name(const char *name, dda_attention_backend *out);

/* Precision: how q k^T and p v are computed. EXACT (0, what a zeroed params struct asks for)
 * multiplies the inputs as they are (fp16 / bf16 on tensor cores, fp32 accumulation). The
 * 8-bit ones quantize on the way (SageAttention's scheme, chosen in benchmarks/NOTES.md "FP8
 * attention"); the C reference defines them exactly, per (b, h):
 *   K smoothed: k'[j, :] = k[j, :] - mu, mu[d] = the mean of k[:, d] over the Sk keys, summed
 *     in double and rounded to fp32 once (exact for the softmax: it shifts every score of a row
 *     by the same q . mu).
 *   Q and K' per token (row) on a symmetric int8 grid: a = max_d |x[d]|, x8 = rint(x * (127 / a))
 *     (fp32, round half to even, |x8| <= 127), dequantization scale a / 127; a row with a below
 *     DDA_ATTN_QUANT_MIN is all 0 with scale 0 (so 127 / a stays finite; likewise a v block).
 *   Scores: s = (float)(sum_d q8[d] k8[d]) * sk * (sq * scale) in fp32 (the int sum is exact,
 *     and so is its conversion: |sum| <= 512 * 127^2 < 2^24).
 *   INT8_QK: p v as EXACT does. FP8: the keys in blocks of DDA_ATTN_V_BLOCK; v per block on
 *     the e4m3 grid: a = max |v| over the block's keys and channels, v8 = e4m3(v * (448 / a)),
 *     scale a / 448; p = exp(s - m), m the row's running max up to the end of the block (the
 *     online softmax), p' = e4m3(448 p) (round to nearest even, saturating); the block's
 *     sum_j p'_j v8_j in fp32, times (a / 448) / 448. The row sum l uses the fp32 p.
 *   lse is that of the scores before smoothing: the smoothed scores' lse plus scale (q . mu)
 *     (fp32, the unquantized q), so the lse of key ranges attended apart (each smoothed by its
 *     own mean) merge as exact attention's do.
 * A non-finite q, k (or, for FP8, v) element cannot be quantized: it makes its row's, its
 * key's (for k: through mu, every key's) or its v block's scale NaN, so the outputs it
 * reaches are NaN (torch's exact attention can give a finite result for a -inf score). So
 * does a k' = k - mu that overflows fp32 (finite keys near +-FLT_MAX of both signs). */
typedef enum {
  DDA_PRECISION_EXACT = 0,   /* "exact" */
  DDA_PRECISION_INT8_QK = 1, /* "int8-qk": int8 q k^T, p v in the inputs' dtype */
  DDA_PRECISION_FP8 = 2,     /* "fp8":     int8 q k^T, e4m3 p v */
  DDA_PRECISION_NUM = 3
} dda_attention_precision;

#define DDA_ATTN_V_BLOCK 128
#define DDA_ATTN_QUANT_MIN 7.88860905e-31f /* 2^-100 */

/* "exact", "int8-qk", "fp8"; NULL for a value out of range. */
const char *dda_attention_precision_name(dda_attention_precision p);
/* The precision of a name; DDA_OK, or DDA_ERR_INVALID_ARGUMENT for an unknown name. */
dda_status dda_attention_precision_from_name(const char *name, dda_attention_precision *out);

/*
 * o[b, i, h, :] = sum_j p[b, h, i, j] v[b, j, h, :],
 * p = softmax_j(scale * q[b, i, h, :] . k[b, j, h, :] + mask[b, h, i, j])
 *
 *   q    [B, Sq, H, D]  strides q_stride_b, q_stride_s, q_stride_h; D contiguous
 *   k, v [B, Sk, H, D]  likewise
 *   o    [B, Sq, H, D]  likewise (normally contiguous = [B, Sq, H*D])
 *   lse  [B, H, Sq] fp32, contiguous, or NULL: log-sum-exp of the scaled,
 *        masked scores of each row (natural log)
 *   mask NULL, or broadcast to [B, H, Sq, Sk] through its four strides
 *        (0 for a broadcast dimension). Kinds below.
 *
 * Scores, softmax and accumulation are fp32 whatever the dtype, so fp16 never
 * overflows in q k^T (this is diffusers' upcast_attention / upcast_softmax).
 * A row whose every key is masked out (bool false or -inf) gives o = 0 and
 * lse = -inf.
 * Requirements: B, H, Sq, Sk >= 1; 8 <= D <= 512 and D % 8 == 0. Offsets are 64-bit, so
 * B * S * stride may exceed 2^31. On CUDA every kernel launches a 1-D grid of
 * (query-row tiles per (b, h)) x B x H blocks, which may reach 2^31 - 1 (the gridDim.x limit);
 * B * H is not bound by the 65535 limit of gridDim.y / z.
 */
typedef enum {
  DDA_MASK_NONE = 0,
  DDA_MASK_BOOL = 1,     /* uint8: nonzero = attend, zero = masked out */
  DDA_MASK_ADD_F32 = 2,  /* additive bias, fp32 */
  DDA_MASK_ADD_F16 = 3,  /* additive bias, fp16 */
  DDA_MASK_ADD_BF16 = 4  /* additive bias, bf16 */
} dda_mask_kind;

typedef struct {
  const void *q;
  const void *k;
  const void *v;
  void *o;
  float *lse;
  const void *mask;
  dda_mask_kind mask_kind;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  int B, H, Sq, Sk, D;
  float scale;
  dda_dtype dtype;
  dda_attention_backend backend; /* DDA_ATTN_AUTO unless the caller forces a family */
  dda_attention_precision precision; /* DDA_PRECISION_EXACT unless the caller asks for 8 bits */
  float scale_log2;              /* scale * log2(e), for the base-2 softmax: set by
                                    dda_attention_fwd_cuda from scale; callers leave it */
} dda_attention_params;

/* ----------------------------------------------------------------- geglu --
 * The gated GELU of diffusers' FeedForward (GEGLU), one pass over the projection:
 *   y[m, n] = x[m, n] * gelu(x[m, N + n])       x [M, 2N] (row stride x_stride_m), y [M, N]
 * gelu exact (erf) or, with approximate = 1, the tanh form; fp32 math. */
typedef struct {
  const void *x;
  void *y;
  int64_t x_stride_m, y_stride_m;
  int64_t M, N;
  int approximate;
  dda_dtype dtype;
} dda_geglu_params;

/* ------------------------------------------------------------ group norm --
 * GroupNorm over a channels-last (NHWC) tensor, optionally after adding a per-(sample,
 * channel) shift and optionally followed by SiLU:
 *   x, y [N, HW, C] (pixel stride C, sample strides x_stride_n / y_stride_n)
 *   x' = x + shift[n, c] (shift [N, C], row stride shift_stride_n >= C, or 0 for one row that
 *   every sample shares; or NULL: x' = x); this is
 *   a ResnetBlock2D's "hidden + time embedding" folded into its norm2
 *   groups of C / G consecutive channels; per (sample, group) mean and biased variance of
 *   x' over HW * C / G values (fp32 statistics);
 *   y = (x' - mean) * rsqrt(var + eps) * gamma[c] + beta[c], then y * sigmoid(y) if silu
 * gamma, beta, shift in x's dtype, or NULL (gamma 1, beta 0, shift 0). */
typedef struct {
  const void *x;
  void *y;
  const void *gamma, *beta;
  const void *shift;
  int64_t x_stride_n, y_stride_n, shift_stride_n;
  int64_t N, HW, C;
  int G;
  float eps;
  int silu;
  dda_dtype dtype;
} dda_group_norm_params;

/* Checks shared by every backend: pointers, sizes, head dim, strides. */
dda_status dda_linear_check(const dda_linear_params *p);
dda_status dda_attention_check(const dda_attention_params *p);
/* Why dda_attention_check refuses p (a static sentence), or NULL if it accepts it.
 * The one place of the rules every backend shares (head dim a multiple of 8 in [8, 512]). */
const char *dda_attention_check_reason(const dda_attention_params *p);
/* Why dda_attention_fwd_cpu would not run p (dda_attention_check_reason, fp32 only,
 * backend AUTO or REFERENCE), or NULL. Static string. */
const char *dda_attention_supported_cpu(const dda_attention_params *p);
dda_status dda_geglu_check(const dda_geglu_params *p);
dda_status dda_group_norm_check(const dda_group_norm_params *p);
/* Why dda_group_norm_cpu / dda_group_norm_cuda would not run p (dda_group_norm_check's
 * rules; fp32 only on the CPU; on CUDA the kernels' vector, alignment and shared-memory
 * limits), or NULL if it runs it. Static string. The one place of these rules. */
const char *dda_group_norm_supported_cpu(const dda_group_norm_params *p);
const char *dda_group_norm_supported_cuda(const dda_group_norm_params *p);

/* CPU references (fp32 only; DDA_ERR_UNSUPPORTED_DTYPE otherwise). */
dda_status dda_linear_cpu(const dda_linear_params *p);
dda_status dda_attention_fwd_cpu(const dda_attention_params *p);
dda_status dda_geglu_cpu(const dda_geglu_params *p);
dda_status dda_group_norm_cpu(const dda_group_norm_params *p);

/* The attention tile over keys that both the CPU reference and the generic
 * CUDA kernel use for the online softmax. */
#define DDA_ATTN_KEY_BLOCK 64

/* CUDA (DDA_ERR_NOT_BUILT in a CPU-only build).
 * dda_linear_cuda uses `workspace` (device memory, may be NULL with bytes 0)
 * as cuBLASLt scratch; DDA_LINEAR_WORKSPACE_BYTES is what it can use best.
 * It plans each new (shape, strides, dtype, epilogue, alignment) once, outside
 * CUDA-graph capture: a shape first seen during capture returns
 * DDA_ERR_UNPLANNED_IN_CAPTURE and leaves the capture intact. */
#define DDA_LINEAR_WORKSPACE_BYTES ((size_t)32 << 20)
dda_status dda_linear_cuda(const dda_linear_params *p, void *workspace,
                           size_t workspace_bytes, cudaStream_t stream);
dda_status dda_attention_fwd_cuda(const dda_attention_params *p, cudaStream_t stream);
dda_status dda_geglu_cuda(const dda_geglu_params *p, cudaStream_t stream);
/* dda_group_norm_cuda needs dda_group_norm_workspace_bytes(p) bytes of device
 * scratch, 16-byte aligned, of any content (block counters, which it zeroes on the
 * stream itself, per-block partial sums and the statistics); the workspace must not
 * be in use by another call until this one's work on `stream` is done. What it
 * refuses (DDA_ERR_INVALID_ARGUMENT: the caller runs another implementation) is what
 * dda_group_norm_supported_cuda names. A memset and two kernels, no sync. */
size_t dda_group_norm_workspace_bytes(const dda_group_norm_params *p);
dda_status dda_group_norm_cuda(const dda_group_norm_params *p, void *workspace, size_t workspace_bytes,
                               cudaStream_t stream);

/* Why dda_attention_fwd_cuda would not run p on the current device with p->backend
 * (arguments, device, build, the family's limits), or NULL if it runs it: the reason behind
 * its DDA_ERR_UNSUPPORTED or DDA_ERR_GRID_LIMIT. A grid refusal states the block count and
 * the limit. The string lives as long as the process (never freed). Reads device
 * attributes, launches nothing. */
const char *dda_attention_supported_cuda(const dda_attention_params *p);

/* The attention kernels the automatic dispatch runs on a device of compute capability
 * cc_major.cc_minor for a dtype, head dim and key length, with 16-byte aligned,
 * unmasked inputs: the distinct kernels over small to large grids (B * H * Sq), largest
 * grid first, joined by '|'. It calls the same selection as dda_attention_fwd_cuda
 * (with the current device's facts when its compute capability is the one asked;
 * otherwise that generation's shared memory, and for 9.x a build with sm_90a).
 * Static string; never NULL; "unsupported: <why>" where nothing runs. */
const char *dda_attention_kernel_name(int cc_major, int cc_minor, dda_dtype dtype,
                                      int head_dim, int seq_k);

/* The exact kernel dda_attention_fwd_cuda runs for p on the current device (the same
 * selection: device, build, dtype, head dim, alignment, grid size, p->backend). Static
 * string; never NULL; "unsupported: <why>" where nothing runs. Reads device attributes,
 * launches nothing. */
const char *dda_attention_kernel_for(const dda_attention_params *p);

/* -------------------------------------------------------------- low rank --
 * The B side of LoRA for every adapter of the projections that read one input, in one pass:
 *   out[m, col0_s + j] += alpha * sum over segments s of f_s * sum_k t[m, r0_s + k] * b_s[j, k]
 *
 *   t        [M, R], row stride t_stride, R contiguous: x . A^T of the stacked adapters
 *   factors  float32 [R] (device memory on CUDA); segment s uses f_s = factors[r0_s], read
 *            when the work runs (a fixed-address buffer: a CUDA graph replays with its
 *            current values)
 *   out      [M, N], row stride out_stride, updated in place
 *   segment  s: ranks [r0, r1) of t, r = r1 - r0 >= 1 (any r); b [n, r] contiguous (torch
 *            Linear layout, one adapter's own weight); output columns [col0, col0 + n)
 * A segment whose factor is exactly 0 adds nothing (not 0 * inf = NaN); a NaN factor gives
 * NaN in its columns. Segments with the same (col0, n) form one target: their terms are
 * summed in fp32, in the order given, and added to out once (one rounding). Columns of out
 * outside every target, and every target whose factors are all 0, are not written.
 * Distinct targets must not share columns; segments may share ranks. out must not overlap
 * t, factors or any b. t, b and out have one dtype: f16 / bf16 on CUDA, also f32 on the CPU.
 */
#define DDA_LOW_RANK_MAX_SEGMENTS 16

typedef struct {
  const void *b;
  int64_t r0, r1;
  int64_t col0, n;
} dda_low_rank_segment;

typedef struct {
  const void *t;
  const float *factors;
  void *out;
  int64_t t_stride, out_stride;
  int64_t M, R, N;
  float alpha;
  int num_segments; /* 1 .. DDA_LOW_RANK_MAX_SEGMENTS */
  dda_low_rank_segment segments[DDA_LOW_RANK_MAX_SEGMENTS];
  dda_dtype dtype;
} dda_low_rank_params;

/* Why p is invalid for every backend (a static sentence), or NULL: pointers, sizes, strides,
 * segment ranges, targets that share columns without being the same (col0, n). The one place
 * of these rules; dda_low_rank_check is its status (DDA_ERR_INVALID_ARGUMENT or
 * DDA_ERR_UNSUPPORTED_DTYPE). */
const char *dda_low_rank_check_reason(const dda_low_rank_params *p);
dda_status dda_low_rank_check(const dda_low_rank_params *p);
/* The C reference: f32, f16 and bf16 storage, fp32 arithmetic. */
dda_status dda_low_rank_accumulate_cpu(const dda_low_rank_params *p);
/* Why dda_low_rank_accumulate_cuda would not run p (the check, then: f16 / bf16 only, pointers
 * aligned to their element, at most 2^31 - 1 thread blocks), or NULL. Static string. Any
 * other alignment, stride, rank or width runs (16-byte vector paths where aligned, element
 * loads otherwise). Launches nothing. */
const char *dda_low_rank_supported_cuda(const dda_low_rank_params *p);
/* One kernel launch on `stream` (tensor cores, fp32 accumulation); no allocation, no sync,
 * capturable. DDA_ERR_NOT_BUILT in a CPU-only build. */
dda_status dda_low_rank_accumulate_cuda(const dda_low_rank_params *p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DDA_H */
