// linear.cu: the projection op through cuBLASLt.
//
//   y[M, N] = alpha * x[M, K] . w[N, K]^T + beta * residual[M, N] + bias[N]
//
//   x        [M, K] row-major, row stride x_stride_m (elements), K contiguous
//   w        [N, K] row-major, contiguous (torch Linear layout, [out, in])
//   bias     [N] or NULL; not scaled by alpha
//   residual [M, N] row-major, row stride residual_stride_m, or NULL (then beta is ignored)
//   y        [M, N] row-major, row stride y_stride_m (e.g. one slice of a packed buffer)
// Storage fp32 / fp16 / bf16 (all the same), accumulation and alpha/beta in fp32.
//
// Row-major to cuBLASLt (column-major) mapping. A row-major [R, C] matrix with row
// stride ld is, byte for byte, a column-major [C, R] matrix with leading dimension ld,
// i.e. its transpose. So we compute y^T = w . x^T as a column-major GEMM with
//   m = N, n = M, k = K
//   A = w as stored: column-major [K, N], lda = K,          opA = T -> op(A) = w    [N, K]
//   B = x as stored: column-major [K, M], ldb = x_stride_m, opB = N -> op(B) = x^T  [K, M]
//   C = residual:    column-major [N, M], ldc = residual_stride_m
//   D = y:           column-major [N, M], ldd = y_stride_m
//   bias: length m = N = the rows of D, which CUBLASLT_EPILOGUE_BIAS broadcasts over
//         the columns (the M rows of y), as wanted.
// This is the "TN" form that cuBLASLt's fastest kernels prefer.
//
// Bias and alpha. cuBLASLt documents D = alpha * (A B) + beta * C, and for
// CUBLASLT_EPILOGUE_BIAS: "Bias vector is broadcasted to all columns and added before
// applying final postprocessing" (cublasLt.h). The bias is added to the scaled result,
// after alpha and beta: D = alpha * A B + beta * C + bias. That is our contract (bias
// not scaled by alpha); the harness checks it with alpha != 1.
//
// C and D. The docs allow in-place (C == D and Cdesc == Ddesc) or out-of-place (C != D,
// same type, shape and order; ldc may differ from ldd). So:
//   - no residual: beta = 0 and C = D with Ddesc (C is then never read);
//   - residual == y with the same row stride: in place, Cdesc = Ddesc;
//   - residual == y with another stride, or residual's span overlapping y's in any
//     other way: DDA_ERR_INVALID_ARGUMENT (a tile could read C after another tile
//     wrote it). x and w must not overlap y (dda.h); that is the caller's to ensure.
//
// Plans. One cuBLASLt handle per device (created on first use), and a cache of plans
// keyed by (device, dtype, M, N, K, strides, has_bias, has_residual, the 16-byte
// alignment of every pointer, workspace bytes). A plan holds the A/B/C/D layouts and
// the algorithm from the heuristic, so a repeated shape makes no heuristic query. The
// matmul descriptor is rebuilt on the stack for every call (cublasLtMatmulDescInit on
// semi-opaque storage, no allocation): it carries the bias pointer, which changes per
// call, and a shared descriptor mutated per call would race between threads.
// Plans and handles live until the process exits (never freed, so nothing is torn down
// after the CUDA runtime during exit).
//
// CUDA graphs. cublasLtMatmul is capturable (cuBLAS docs, "CUDA Graphs Support"); with
// CUBLASLT_POINTER_MODE_HOST, as here, alpha and beta are baked into the graph at
// capture time, and the workspace is the caller's, so nothing is allocated. Creating a
// handle or querying the heuristic during capture is not documented as safe, and on
// CUDA 13 cuBLASLt's heuristic query is reported to fail inside capture. So a plan
// must exist before capture: call each shape once outside capture (warm-up). A missing
// plan during capture returns DDA_ERR_UNPLANNED_IN_CAPTURE without calling cuBLASLt, so
// the capture itself stays valid and the glue can say "run this shape once before
// capturing".
//
// Never synchronises; every launch goes to `stream`.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <new>

#include "dda.h"


namespace {

// cuBLASLt requires the workspace pointer to be 256-byte aligned.
constexpr uintptr_t kWorkspaceAlign = 256;

struct LinearPlan {
  cublasLtMatrixLayoutOpaque_t a, b, c, d;  // see the mapping above; c unused without residual
  cublasLtMatmulAlgo_t algo;
};

// (device, dtype, M, N, K, x_stride, residual_stride or -1, y_stride, has_bias,
//  has_residual, alignment bits, workspace bytes)
using PlanKey = std::array<int64_t, 12>;

struct LinearState {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;  // device -> handle
  std::map<PlanKey, std::unique_ptr<LinearPlan>> plans;  // nodes never move: plans are stable
};

LinearState &state() {
  static LinearState *s = new LinearState();  // leaked on purpose, see "Plans" above
  return *s;
}

dda_status cublas_error(cublasStatus_t s) {
  dda_set_backend_error((int)s);
  return DDA_ERR_CUBLAS;
}

dda_status cuda_error(cudaError_t e) {
  dda_set_backend_error((int)e);
  return DDA_ERR_CUDA;
}

#define LT_TRY(call)                                    \
  do {                                                  \
    cublasStatus_t st_ = (call);                        \
    if (st_ != CUBLAS_STATUS_SUCCESS) return st_;       \
  } while (0)

cudaDataType_t cuda_type(dda_dtype t) {
  return t == DDA_F16 ? CUDA_R_16F : t == DDA_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

size_t elem_size(dda_dtype t) { return t == DDA_F32 ? 4 : 2; }

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

// Whether the byte spans of two row-major [rows, cols] matrices (row strides ld_p, ld_q)
// intersect. Conservative: interleaved but disjoint slices of one buffer count as overlap.
bool ranges_overlap(const void *p, const void *q, int64_t rows, int64_t cols, int64_t ld_p,
                    int64_t ld_q, size_t es) {
  const uintptr_t p0 = (uintptr_t)p, q0 = (uintptr_t)q;
  const uintptr_t p1 = p0 + (uintptr_t)((rows - 1) * ld_p + cols) * es;
  const uintptr_t q1 = q0 + (uintptr_t)((rows - 1) * ld_q + cols) * es;
  return p0 < q1 && q0 < p1;
}

// The matmul descriptor: compute fp32 (CUBLAS_COMPUTE_32F never uses TF32; that needs
// CUBLAS_COMPUTE_32F_FAST_TF32), scale fp32, opA = T, opB = N, optional bias epilogue.
cublasStatus_t init_matmul_desc(cublasLtMatmulDescOpaque_t *desc, const void *bias) {
  LT_TRY(cublasLtMatmulDescInit(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  if (bias) {
    const uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
    LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                          sizeof(bias)));
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Builds the layouts of `plan` and picks its algorithm with the heuristic.
// align_*: the alignment in bytes each pointer is guaranteed (16, or the element size).
cublasStatus_t build_plan(cublasLtHandle_t handle, const dda_linear_params *p, size_t ws_bytes,
                          const uint32_t align[4], LinearPlan *plan) {
  const cudaDataType_t t = cuda_type(p->dtype);
  const bool has_res = p->residual != nullptr;
  LT_TRY(cublasLtMatrixLayoutInit(&plan->a, t, (uint64_t)p->K, (uint64_t)p->N, p->K));
  LT_TRY(cublasLtMatrixLayoutInit(&plan->b, t, (uint64_t)p->K, (uint64_t)p->M, p->x_stride_m));
  LT_TRY(cublasLtMatrixLayoutInit(&plan->d, t, (uint64_t)p->N, (uint64_t)p->M, p->y_stride_m));
  LT_TRY(cublasLtMatrixLayoutInit(&plan->c, t, (uint64_t)p->N, (uint64_t)p->M,
                                  has_res ? p->residual_stride_m : p->y_stride_m));

  cublasLtMatmulDescOpaque_t desc;
  LT_TRY(init_matmul_desc(&desc, p->bias));

  cublasLtMatmulPreferenceOpaque_t pref;
  LT_TRY(cublasLtMatmulPreferenceInit(&pref));
  const uint64_t ws = ws_bytes;
  LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &ws, sizeof(ws)));
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, align_attr[i], &align[i], sizeof(align[i])));
  if (p->dtype == DDA_F32) {
    // Belt and braces for "true fp32": also filter out any TF32 kernel (e.g. one an
    // environment override could otherwise let in).
    const uint64_t impl = ~(uint64_t)CUBLASLT_NUMERICAL_IMPL_FLAGS_INPUT_TF32;
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_IMPL_MASK, &impl,
                                                sizeof(impl)));
  }

  // Split-K partial sums: for fp16/bf16 the INPLACE and OUTPUT_TYPE schemes add the
  // partials in the 16-bit output type, which breaks "fp32 accumulation". Ask for the
  // COMPUTE_TYPE scheme (or none) first; only if no algorithm qualifies take any scheme.
  const uint32_t masks[2] = {CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE, CUBLASLT_REDUCTION_SCHEME_MASK};
  for (int i = (p->dtype == DDA_F32 ? 1 : 0); i < 2; ++i) {
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                &masks[i], sizeof(masks[i])));
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, &desc, &plan->a, &plan->b,
                                          has_res ? &plan->c : &plan->d, &plan->d, &pref, 1,
                                          &result, &found));
    if (found > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
      plan->algo = result.algo;
      return CUBLAS_STATUS_SUCCESS;
    }
  }
  return CUBLAS_STATUS_NOT_SUPPORTED;  // no algorithm for this problem
}

}  // namespace

extern "C" dda_status dda_linear_cuda(const dda_linear_params *p, void *workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  dda_status st = dda_linear_check(p);
  if (st != DDA_OK) return st;
  const size_t es = elem_size(p->dtype);

  // Every pointer must at least hold whole elements.
  const void *ptrs[5] = {p->w, p->x, p->residual, p->y, p->bias};
  for (const void *ptr : ptrs)
    if (((uintptr_t)ptr % es) != 0) return DDA_ERR_INVALID_ARGUMENT;

  const bool has_res = p->residual != nullptr;
  const bool in_place = has_res && p->residual == p->y;
  if (in_place && p->residual_stride_m != p->y_stride_m) return DDA_ERR_INVALID_ARGUMENT;
  if (has_res && !in_place &&
      ranges_overlap(p->residual, p->y, p->M, p->N, p->residual_stride_m, p->y_stride_m, es))
    return DDA_ERR_INVALID_ARGUMENT;

  // The workspace as cuBLASLt wants it: 256-byte aligned (rounded up inside the buffer).
  void *ws = nullptr;
  size_t ws_bytes = 0;
  if (workspace && workspace_bytes > 0) {
    const uintptr_t base = (uintptr_t)workspace;
    const uintptr_t aligned = (base + kWorkspaceAlign - 1) & ~(kWorkspaceAlign - 1);
    if (aligned - base < workspace_bytes) {
      ws = (void *)aligned;
      ws_bytes = workspace_bytes - (size_t)(aligned - base);
    }
  }

  int device = 0;
  cudaError_t ce = cudaGetDevice(&device);
  if (ce != cudaSuccess) return cuda_error(ce);

  // Alignment of A = w, B = x, C, D = y, and the bias (which only enters the key).
  const void *c_ptr = has_res ? p->residual : p->y;
  const bool al[5] = {aligned16(p->w), aligned16(p->x), aligned16(c_ptr), aligned16(p->y),
                      p->bias == nullptr || aligned16(p->bias)};
  int64_t align_bits = 0;
  for (int i = 0; i < 5; ++i) align_bits |= (int64_t)al[i] << i;
  const PlanKey key = {device,
                       (int64_t)p->dtype,
                       p->M,
                       p->N,
                       p->K,
                       p->x_stride_m,
                       has_res ? p->residual_stride_m : -1,
                       p->y_stride_m,
                       p->bias != nullptr,
                       has_res,
                       align_bits,
                       (int64_t)ws_bytes};

  LinearState &s = state();
  const LinearPlan *plan = nullptr;
  cublasLtHandle_t handle = nullptr;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    auto it = s.plans.find(key);
    if (it != s.plans.end()) {
      plan = it->second.get();
      handle = s.handles.find(device)->second;  // created before the plan's first build
    }
  }

  if (!plan) {
    // No plan yet: building one calls cuBLASLt outside any stream, which is not safe
    // during graph capture (see the header). Refuse, leaving the capture intact.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    ce = cudaStreamIsCapturing(stream, &capture);
    if (ce != cudaSuccess) return cuda_error(ce);
    if (capture != cudaStreamCaptureStatusNone) return DDA_ERR_UNPLANNED_IN_CAPTURE;

    {
      std::lock_guard<std::mutex> lock(s.mutex);
      auto h = s.handles.find(device);
      if (h == s.handles.end()) {
        cublasLtHandle_t created = nullptr;
        const cublasStatus_t cs = cublasLtCreate(&created);
        if (cs != CUBLAS_STATUS_SUCCESS) return cublas_error(cs);
        try {
          h = s.handles.emplace(device, created).first;
        } catch (const std::bad_alloc &) {
          cublasLtDestroy(created);
          return DDA_ERR_OUT_OF_MEMORY;
        }
      }
      handle = h->second;
    }

    // Built outside the lock; if another thread raced us to the same key, keep theirs.
    std::unique_ptr<LinearPlan> fresh(new (std::nothrow) LinearPlan());
    if (!fresh) return DDA_ERR_OUT_OF_MEMORY;
    const uint32_t align[4] = {al[0] ? 16u : (uint32_t)es, al[1] ? 16u : (uint32_t)es,
                               al[2] ? 16u : (uint32_t)es, al[3] ? 16u : (uint32_t)es};
    const cublasStatus_t bs = build_plan(handle, p, ws_bytes, align, fresh.get());
    if (bs != CUBLAS_STATUS_SUCCESS) return cublas_error(bs);
    std::lock_guard<std::mutex> lock(s.mutex);
    try {
      plan = s.plans.emplace(key, std::move(fresh)).first->second.get();
    } catch (const std::bad_alloc &) {
      return DDA_ERR_OUT_OF_MEMORY;
    }
  }

  cublasLtMatmulDescOpaque_t desc;
  cublasStatus_t cs = init_matmul_desc(&desc, p->bias);
  if (cs != CUBLAS_STATUS_SUCCESS) return cublas_error(cs);

  const float alpha = p->alpha;
  const float beta = has_res ? p->beta : 0.0f;
  // Layouts are never written after the plan is built; cuBLASLt takes them non-const.
  LinearPlan *pl = const_cast<LinearPlan *>(plan);
  cublasLtMatrixLayout_t c_desc = (has_res && !in_place) ? &pl->c : &pl->d;
  cs = cublasLtMatmul(handle, &desc, &alpha, p->w, &pl->a, p->x, &pl->b, &beta, c_ptr, c_desc,
                      p->y, &pl->d, &pl->algo, ws, ws_bytes, stream);
  if (cs != CUBLAS_STATUS_SUCCESS) return cublas_error(cs);
  return DDA_OK;
}
