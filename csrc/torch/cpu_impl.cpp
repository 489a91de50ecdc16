// cpu_impl.cpp: the CPU impls of the dda ops: checks, then the C references,
// split over rows (linear) or (batch, head) pairs (attention) with at::parallel_for.
#include <ATen/Parallel.h>
#include <atomic>
#include <torch/library.h>

#include "dda.h"
#include "glue.h"

namespace {

void linear_out_cpu(const at::Tensor &x, const at::Tensor &weight,
                    const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &residual,
                    double alpha, double beta, at::Tensor &out) {
  const dda_linear_params p = dda_glue::linear_params(x, weight, bias, residual, alpha, beta, out, true);
  dda_glue::throw_on_error(dda_linear_check(&p), "dda.linear (cpu)");
  std::atomic<int> status{DDA_OK};  // any failing chunk's status
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    dda_linear_params part = p;
    part.M = end - begin;
    part.x = static_cast<const float *>(p.x) + begin * p.x_stride_m;
    part.y = static_cast<float *>(p.y) + begin * p.y_stride_m;
    if (p.residual) part.residual = static_cast<const float *>(p.residual) + begin * p.residual_stride_m;
    const dda_status st = dda_linear_cpu(&part);
    if (st != DDA_OK) status = st;
  });
  dda_glue::throw_on_error(static_cast<dda_status>(status.load()), "dda.linear (cpu)");
}

void attention_out_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                       const std::optional<at::Tensor> &mask, double scale, at::Tensor &out,
                       const std::optional<at::Tensor> &lse, c10::string_view backend,
                       c10::string_view precision) {
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, scale, out, lse, true, backend, precision);
  if (const char *why = dda_attention_supported_cpu(&p)) dda_glue::throw_unsupported("dda.attention (cpu)", p, why, q);
  std::atomic<int> status{DDA_OK};  // any failing task's status
  // One (b, h) pair per task: offset every pointer, keep the strides.
  at::parallel_for(0, static_cast<int64_t>(p.B) * p.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      dda_attention_params one = p;
      one.B = 1;
      one.H = 1;
      one.q = static_cast<const float *>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
      one.k = static_cast<const float *>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
      one.v = static_cast<const float *>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
      one.o = static_cast<float *>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
      if (p.lse) one.lse = p.lse + bh * p.Sq;
      if (p.mask_kind != DDA_MASK_NONE) {
        const int64_t off = b * p.mask_stride_b + h * p.mask_stride_h;
        const size_t esize = p.mask_kind == DDA_MASK_BOOL ? 1 : p.mask_kind == DDA_MASK_ADD_F32 ? 4 : 2;
        one.mask = static_cast<const char *>(p.mask) + off * esize;
      }
      const dda_status st = dda_attention_fwd_cpu(&one);
      if (st != DDA_OK) status = st;
    }
  });
  dda_glue::throw_on_error(static_cast<dda_status>(status.load()), "dda.attention (cpu)");
}

// The CPU reference runs every case attention_params and dda_attention_supported_cpu
// accept; bad inputs raise the same errors as the op itself.
std::string attention_kernel_for_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                     const std::optional<at::Tensor> &mask, c10::string_view backend,
                                     c10::string_view precision) {
  const at::Tensor out = dda_glue::attention_query_output(q);
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, 1.0, out, std::nullopt, true, backend,
                                                           precision);
  const char *why = dda_attention_supported_cpu(&p);
  if (why) return std::string("unsupported: ") + why;
  return p.precision == DDA_PRECISION_EXACT ? std::string("cpu_reference")
                                            : std::string("cpu_reference (") + dda_attention_precision_name(p.precision) + ")";
}

std::string attention_supported_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                    const std::optional<at::Tensor> &mask, c10::string_view backend,
                                    c10::string_view precision) {
  return dda_glue::attention_refusal(q, k, v, mask, backend, precision, true, &dda_attention_supported_cpu);
}

at::Tensor geglu_cpu(const at::Tensor &x, bool approximate) {
  at::Tensor out = dda_glue::geglu_output(x);
  const dda_geglu_params p = dda_glue::geglu_params(x, approximate, out, true);
  dda_glue::throw_on_error(dda_geglu_cpu(&p), "dda.geglu (cpu)");
  return out;
}

std::string group_norm_supported_cpu(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                                     const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &shift) {
  return dda_glue::group_norm_refusal(x, num_groups, weight, bias, shift, true, &dda_group_norm_supported_cpu);
}

at::Tensor group_norm_cpu(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                          const std::optional<at::Tensor> &bias, double eps, bool silu,
                          const std::optional<at::Tensor> &shift) {
  at::Tensor out = dda_glue::group_norm_output(x);
  const dda_group_norm_params p = dda_glue::group_norm_params(x, num_groups, weight, bias, eps, silu, shift, &out, true);
  dda_glue::throw_on_error(dda_group_norm_cpu(&p), "dda.group_norm (cpu)");
  return out;
}

// The C reference over rows split with at::parallel_for (each chunk offsets t and out).
void low_rank_accumulate_cpu(const at::Tensor &t, const at::Tensor &factors, at::TensorList b, at::IntArrayRef r0,
                             at::IntArrayRef r1, at::IntArrayRef col0, double alpha, at::Tensor &out) {
  const dda_low_rank_params p = dda_glue::low_rank_params(t, factors, b, r0, r1, col0, alpha, out, true);
  if (p.M == 0) return;
  dda_glue::throw_on_error(dda_low_rank_check(&p), "dda.low_rank_accumulate (cpu)");
  const int64_t es = p.dtype == DDA_F32 ? 4 : 2;
  std::atomic<int> status{DDA_OK};  // any failing chunk's status
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    dda_low_rank_params part = p;
    part.M = end - begin;
    part.t = static_cast<const char *>(p.t) + begin * p.t_stride * es;
    part.out = static_cast<char *>(p.out) + begin * p.out_stride * es;
    const dda_status st = dda_low_rank_accumulate_cpu(&part);
    if (st != DDA_OK) status = st;
  });
  dda_glue::throw_on_error(static_cast<dda_status>(status.load()), "dda.low_rank_accumulate (cpu)");
}

}  // namespace

TORCH_LIBRARY_IMPL(dda, CPU, m) {
  m.impl("geglu", &geglu_cpu);
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_supported", &group_norm_supported_cpu);
  m.impl("linear", &dda_glue::linear<&linear_out_cpu>);
  m.impl("linear_out", &linear_out_cpu);
  m.impl("attention", &dda_glue::attention<&attention_out_cpu>);
  m.impl("attention_out", &attention_out_cpu);
  m.impl("attention_kernel_for", &attention_kernel_for_cpu);
  m.impl("attention_supported", &attention_supported_cpu);
  m.impl("low_rank_accumulate", &low_rank_accumulate_cpu);
}
