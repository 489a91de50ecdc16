// ops.cpp: the one place the dda op schemas are declared, plus the Python module
// stub that lets `import deepspeed_diffusers_attn._C` load this library.
// Backend impls: cpu_impl.cpp (CPU), cuda_impl.cpp (CUDA). Fake impls: ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "dda.h"

extern "C" {
PyObject *PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace {

std::string attention_kernel_name(int64_t cc_major, int64_t cc_minor, at::ScalarType dtype,
                                  int64_t head_dim, int64_t seq_k) {
  dda_dtype dt = DDA_F32;
  if (dtype == at::kHalf) dt = DDA_F16;
  else if (dtype == at::kBFloat16) dt = DDA_BF16;
  else if (dtype != at::kFloat) return std::string("unsupported: dtype ") + c10::toString(dtype);
  return dda_attention_kernel_name(static_cast<int>(cc_major), static_cast<int>(cc_minor), dt,
                                   static_cast<int>(head_dim), static_cast<int>(seq_k));
}

std::vector<std::string> attention_precisions() {
  std::vector<std::string> names;
  for (int i = 0; i < DDA_PRECISION_NUM; ++i)
    names.emplace_back(dda_attention_precision_name(static_cast<dda_attention_precision>(i)));
  return names;
}

std::vector<std::string> attention_backends() {
  std::vector<std::string> names;
  for (int b = 0; b < DDA_ATTN_NUM_BACKENDS; ++b)
    names.emplace_back(dda_attention_backend_name(static_cast<dda_attention_backend>(b)));
  return names;
}

bool cuda_built() {
#ifdef DDA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(dda, m) {
  // y[..., N] = alpha * x[..., K] @ weight[N, K]^T + beta * residual[..., N] + bias[N]
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float alpha, float beta) -> Tensor");
  m.def("linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float alpha, float beta, Tensor(a!) out) -> ()");
  // out[B, Sq, H, D] = softmax(scale * q k^T + mask) v; lse [B, H, Sq] fp32 (empty unless asked);
  // backend: "auto" or one kernel family (attention_backends()), refused if it cannot run the inputs;
  // precision: "exact" or an 8-bit scheme (attention_precisions(), dda.h), refused where no kernel has it
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool return_lse, str backend=\"auto\", str precision=\"exact\") -> (Tensor, Tensor)");
  m.def("attention_out(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor(a!) out, Tensor(b!)? lse, str backend=\"auto\", str precision=\"exact\") -> ()");
  m.def("attention_kernel_name(int cc_major, int cc_minor, ScalarType dtype, int head_dim, int seq_k) -> str",
        &attention_kernel_name);
  // the kernel attention would run for these inputs (backend impls: cpu_impl.cpp, cuda_impl.cpp)
  m.def("attention_kernel_for(Tensor q, Tensor k, Tensor v, Tensor? mask, str backend=\"auto\", str precision=\"exact\") -> str");
  // why attention would refuse these inputs with this backend ("" if it runs them)
  m.def("attention_supported(Tensor q, Tensor k, Tensor v, Tensor? mask, str backend=\"auto\", str precision=\"exact\") -> str");
  // "auto", "reference" (the CPU's C reference), then the CUDA kernel families
  m.def("attention_backends() -> str[]", &attention_backends);
  // "exact", then the 8-bit schemes (dda.h: dda_attention_precision)
  m.def("attention_precisions() -> str[]", &attention_precisions);
  // y[..., N] = x[..., :N] * gelu(x[..., N:]) (diffusers GEGLU); approximate: tanh form
  m.def("geglu(Tensor x, bool approximate) -> Tensor");
  // GroupNorm (+ SiLU) of a channels-last [N, C, H, W] x; the result is channels-last
  m.def("group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, Tensor? shift=None) -> Tensor");
  // why group_norm would refuse these inputs ("" if it runs them)
  m.def("group_norm_supported(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? shift=None) -> str");
  m.def("cuda_built() -> bool", &cuda_built);
  // LoRA's B side, one launch: out[..., col0_s : col0_s + n_s] += alpha * factors[r0_s] * t[..., r0_s:r1_s] @ b_s^T
  // for every segment s (n_s = b_s.size(0)); segments with the same (col0, n) summed in fp32, added once
  m.def("low_rank_accumulate(Tensor t, Tensor factors, Tensor[] b, int[] r0, int[] r1, int[] col0, float alpha, Tensor(a!) out) -> ()");
}
