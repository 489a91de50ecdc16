// glue.h: shared by the CPU and CUDA impls. Turns tensors into the C ABI's
// params structs after checking them, and turns a dda_status into a torch error.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "dda.h"

namespace dda_glue {

// Raises a c10::Error naming the op, the status and the backend's own error code.
void throw_on_error(dda_status st, const char *op);

dda_dtype to_dda_dtype(at::ScalarType t);

// Checks x [..., K], weight [N, K], bias [N]?, residual [..., N]?, out [..., N]
// and fills the params (pointers and row strides). `cpu` restricts to fp32.
dda_linear_params linear_params(const at::Tensor &x, const at::Tensor &weight,
                                const std::optional<at::Tensor> &bias,
                                const std::optional<at::Tensor> &residual, double alpha,
                                double beta, const at::Tensor &out, bool cpu);

// Checks q [B, Sq, H, D], k/v [B, Sk, H, D], mask (broadcastable to [B, H, Sq, Sk]),
// out [B, Sq, H, D], lse [B, H, Sq] fp32 and the backend and precision names, and fills the params;
// the rules every backend shares are dda_attention_check_reason's.
dda_attention_params attention_params(const at::Tensor &q, const at::Tensor &k,
                                      const at::Tensor &v, const std::optional<at::Tensor> &mask,
                                      double scale, const at::Tensor &out,
                                      const std::optional<at::Tensor> &lse, bool cpu,
                                      c10::string_view backend, c10::string_view precision);

// Raises "<op>: backend '<name>' cannot run these inputs: <why>" (or, for "auto", that no
// kernel runs them), naming q's shape, strides and dtype.
[[noreturn]] void throw_unsupported(const char *op, const dda_attention_params &p, const char *why,
                                    const at::Tensor &q);

// The reason an attention op would refuse these inputs ("" if it takes them): the op's
// own checks, then `supported` (dda_attention_supported_cpu / _cuda) on the params.
std::string attention_refusal(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                              const std::optional<at::Tensor> &mask, c10::string_view backend,
                              c10::string_view precision, bool cpu,
                              const char *(*supported)(const dda_attention_params *));

// Checks x [..., 2N] (rows collapsible), out [..., N] and fills the params.
dda_geglu_params geglu_params(const at::Tensor &x, bool approximate, const at::Tensor &out, bool cpu);

// Checks x [N, C, H, W] channels-last contiguous, weight / bias [C]?, shift, out like x
// (out_or_null: nullptr for a query, which checks x alone), and fills the params.
dda_group_norm_params group_norm_params(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                                        const std::optional<at::Tensor> &bias, double eps, bool silu,
                                        const std::optional<at::Tensor> &shift, const at::Tensor *out_or_null,
                                        bool cpu);

// Why group_norm would refuse these inputs ("" if it runs them): the glue's own checks,
// then `supported` (dda_group_norm_supported_cpu / _cuda) on the params. Allocates nothing.
std::string group_norm_refusal(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                               const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &shift, bool cpu,
                               const char *(*supported)(const dda_group_norm_params *));

// Checks t [..., R] (rows collapsible, R contiguous), factors float32 [R] contiguous, one
// b [n, r1 - r0] contiguous per segment with its r0, r1, col0, out [..., N] (as many rows as
// t; updated in place), the segment rules of dda_low_rank_check_reason, and no overlap of out
// with an input; fills the params. `cpu`: the C reference's dtypes (f32, f16, bf16), else
// f16 / bf16. M = 0 (no rows) passes with params.M = 0: nothing to do.
dda_low_rank_params low_rank_params(const at::Tensor &t, const at::Tensor &factors, at::TensorList b,
                                    at::IntArrayRef r0, at::IntArrayRef r1, at::IntArrayRef col0, double alpha,
                                    const at::Tensor &out, bool cpu);

// The fresh outputs of the functional ops. attention_output first refuses q sizes beyond
// the C ABI's ints, naming the size (before allocating).
at::Tensor linear_output(const at::Tensor &x, const at::Tensor &weight);
at::Tensor attention_output(const at::Tensor &q);
// The output the attention queries (kernel_for, supported) check in place of the op's own:
// q's shape over one fresh [D] row with strides (0, 0, 0, 1). It is aligned like a fresh
// output (D is a multiple of 8 wherever a kernel runs, so every stride of either is a
// multiple of 8 elements) and allocates D elements instead of B * Sq * H * D.
at::Tensor attention_query_output(const at::Tensor &q);
at::Tensor attention_lse(const at::Tensor &q, bool return_lse);
at::Tensor geglu_output(const at::Tensor &x);
at::Tensor group_norm_output(const at::Tensor &x);

using LinearOut = void (*)(const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &,
                           const std::optional<at::Tensor> &, double, double, at::Tensor &);
using AttentionOut = void (*)(const at::Tensor &, const at::Tensor &, const at::Tensor &,
                              const std::optional<at::Tensor> &, double, at::Tensor &,
                              const std::optional<at::Tensor> &, c10::string_view, c10::string_view);

// The functional ops of a backend: allocate the outputs, then run its *_out impl.
template <LinearOut out_impl>
at::Tensor linear(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                  const std::optional<at::Tensor> &residual, double alpha, double beta) {
  at::Tensor out = linear_output(x, weight);
  out_impl(x, weight, bias, residual, alpha, beta, out);
  return out;
}

template <AttentionOut out_impl>
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor &q, const at::Tensor &k,
                                             const at::Tensor &v, const std::optional<at::Tensor> &mask,
                                             double scale, bool return_lse, c10::string_view backend,
                                             c10::string_view precision) {
  at::Tensor out = attention_output(q);
  at::Tensor lse = attention_lse(q, return_lse);
  out_impl(q, k, v, mask, scale, out, return_lse ? std::optional<at::Tensor>(lse) : std::nullopt, backend,
           precision);
  return {out, lse};
}

}  // namespace dda_glue
