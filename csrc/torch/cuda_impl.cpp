// cuda_impl.cpp: the CUDA impls of the dda ops: checks, device guard, the current
// stream, then the C launchers. Never synchronises.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dda.h"
#include "glue.h"

namespace {

// dda_glue::throw_on_error, naming the CUDA error behind DDA_ERR_CUDA.
void throw_on_error(dda_status st, const char *op) {
  if (st == DDA_ERR_CUDA) {
    const auto e = static_cast<cudaError_t>(dda_last_backend_error());
    TORCH_CHECK(false, std::string(op) + " failed: " + dda_status_string(st) + " (" + cudaGetErrorName(e) + ": " +
                           cudaGetErrorString(e) + ")");
  }
  dda_glue::throw_on_error(st, op);
}

void linear_out_cuda(const at::Tensor &x, const at::Tensor &weight,
                     const std::optional<at::Tensor> &bias,
                     const std::optional<at::Tensor> &residual, double alpha, double beta,
                     at::Tensor &out) {
  const dda_linear_params p = dda_glue::linear_params(x, weight, bias, residual, alpha, beta, out, false);
  const c10::cuda::CUDAGuard guard(x.device());
  // cuBLASLt scratch from torch's caching allocator per call (a cached block: no
  // cudaMalloc after warm-up; inside a capture it comes from the graph's pool). It is
  // not kept per (device, stream): torch.compile's cudagraph trees warm up on their own
  // stream inside their pool, where a kept block would be an untracked live allocation.
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(DDA_LINEAR_WORKSPACE_BYTES)}, x.options().dtype(at::kByte));
  throw_on_error(dda_linear_cuda(&p, workspace.data_ptr(), DDA_LINEAR_WORKSPACE_BYTES,
                                 c10::cuda::getCurrentCUDAStream().stream()),
                 "dda.linear (cuda)");
}

void attention_out_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                        const std::optional<at::Tensor> &mask, double scale, at::Tensor &out,
                        const std::optional<at::Tensor> &lse, c10::string_view backend,
                        c10::string_view precision) {
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, scale, out, lse, false, backend, precision);
  const c10::cuda::CUDAGuard guard(q.device());
  const dda_status st = dda_attention_fwd_cuda(&p, c10::cuda::getCurrentCUDAStream().stream());
  // The selection refused (no family, or the grid beyond 2^31 - 1 blocks): ask it why, with
  // the sizes (only on this failure path, so no second selection per call).
  if (st == DDA_ERR_UNSUPPORTED || st == DDA_ERR_GRID_LIMIT)
    dda_glue::throw_unsupported("dda.attention (cuda)", p, dda_attention_supported_cuda(&p), q);
  throw_on_error(st, "dda.attention (cuda)");
}

std::string attention_kernel_for_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                      const std::optional<at::Tensor> &mask, c10::string_view backend,
                                      c10::string_view precision) {
  const at::Tensor out = dda_glue::attention_query_output(q);  // aligned like the op's own output
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, 1.0, out, std::nullopt, false, backend,
                                                           precision);
  const c10::cuda::CUDAGuard guard(q.device());
  return dda_attention_kernel_for(&p);
}

std::string attention_supported_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                     const std::optional<at::Tensor> &mask, c10::string_view backend,
                                     c10::string_view precision) {
  const c10::cuda::CUDAGuard guard(q.device());
  return dda_glue::attention_refusal(q, k, v, mask, backend, precision, false, &dda_attention_supported_cuda);
}

at::Tensor geglu_cuda(const at::Tensor &x, bool approximate) {
  at::Tensor out = dda_glue::geglu_output(x);
  const dda_geglu_params p = dda_glue::geglu_params(x, approximate, out, false);
  const c10::cuda::CUDAGuard guard(x.device());
  throw_on_error(dda_geglu_cuda(&p, c10::cuda::getCurrentCUDAStream().stream()), "dda.geglu (cuda)");
  return out;
}

std::string group_norm_supported_cuda(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                                      const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &shift) {
  return dda_glue::group_norm_refusal(x, num_groups, weight, bias, shift, false, &dda_group_norm_supported_cuda);
}

// The statistics scratch comes from torch's caching allocator (capture-safe, like linear's).
at::Tensor group_norm_cuda(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                           const std::optional<at::Tensor> &bias, double eps, bool silu,
                           const std::optional<at::Tensor> &shift) {
  at::Tensor out = dda_glue::group_norm_output(x);
  const dda_group_norm_params p = dda_glue::group_norm_params(x, num_groups, weight, bias, eps, silu, shift, &out, false);
  if (const char *why = dda_group_norm_supported_cuda(&p)) TORCH_CHECK(false, "dda.group_norm (cuda): ", why);
  const c10::cuda::CUDAGuard guard(x.device());
  const size_t bytes = dda_group_norm_workspace_bytes(&p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  throw_on_error(dda_group_norm_cuda(&p, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream().stream()),
                 "dda.group_norm (cuda)");
  return out;
}

// One launch on the current stream; a refusal (dtype, alignment, grid) is explained by
// dda_low_rank_supported_cuda, asked only on that path.
void low_rank_accumulate_cuda(const at::Tensor &t, const at::Tensor &factors, at::TensorList b, at::IntArrayRef r0,
                              at::IntArrayRef r1, at::IntArrayRef col0, double alpha, at::Tensor &out) {
  const dda_low_rank_params p = dda_glue::low_rank_params(t, factors, b, r0, r1, col0, alpha, out, false);
  if (p.M == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const dda_status st = dda_low_rank_accumulate_cuda(&p, c10::cuda::getCurrentCUDAStream().stream());
  if (st != DDA_OK && st != DDA_ERR_CUDA) {
    const char *why = dda_low_rank_supported_cuda(&p);
    TORCH_CHECK(why == nullptr, "dda.low_rank_accumulate (cuda): ", why ? why : "", " (M = ", p.M, ", ",
                p.num_segments, " segments)");
  }
  throw_on_error(st, "dda.low_rank_accumulate (cuda)");
}

}  // namespace

TORCH_LIBRARY_IMPL(dda, CUDA, m) {
  m.impl("geglu", &geglu_cuda);
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_supported", &group_norm_supported_cuda);
  m.impl("linear", &dda_glue::linear<&linear_out_cuda>);
  m.impl("linear_out", &linear_out_cuda);
  m.impl("attention", &dda_glue::attention<&attention_out_cuda>);
  m.impl("attention_out", &attention_out_cuda);
  m.impl("attention_kernel_for", &attention_kernel_for_cuda);
  m.impl("attention_supported", &attention_supported_cuda);
  m.impl("low_rank_accumulate", &low_rank_accumulate_cuda);
}
