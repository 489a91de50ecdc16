// glue.cpp: input checks and tensor -> params for every backend.
#include "glue.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace dda_glue {
namespace {

// Messages are built with std::string and std::to_string, not iostreams: on some
// toolchains (seen with torch 2.11 + g++ 13) an extension's inline ostream number
// formatting crashes inside libstdc++'s locale facets, so none is used here.
void append(std::string &s, const char *v) { s += v; }
void append(std::string &s, const std::string &v) { s += v; }
void append(std::string &s, at::ScalarType v) { s += c10::toString(v); }
void append(std::string &s, const c10::Device &v) { s += v.str(); }
void append(std::string &s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
void append(std::string &s, const std::vector<int64_t> &v) { append(s, at::IntArrayRef(v)); }
template <class T, class = std::enable_if_t<std::is_arithmetic_v<T>>>
void append(std::string &s, T v) { s += std::to_string(v); }

template <class... A>
std::string cat(const A &...a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

// TORCH_CHECK with a message made by cat() (one std::string reaches c10).
#define DDA_CHECK(cond, ...) TORCH_CHECK((cond), ::dda_glue::cat(__VA_ARGS__))

std::string describe(const at::Tensor &t) {
  return cat("shape ", t.sizes(), ", strides ", t.strides(), ", dtype ", t.scalar_type(), ", device ",
             t.device());
}

// The row stride of t seen as a [rows, t.size(-1)] matrix, if its leading dims
// collapse into one strided dim without a copy (and its last dim is contiguous).
int64_t row_stride(const at::Tensor &t, const char *op, const char *name) {
  DDA_CHECK(t.dim() >= 2, op, ": ", name, " must have at least 2 dims, got ", describe(t));
  DDA_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
              " must be contiguous in its last dim, got ", describe(t));
  // Size-1 dims have no say; the others, innermost first, must nest exactly.
  int64_t stride = -1, expect = -1;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (stride < 0) {
      stride = t.stride(d);
    } else {
      DDA_CHECK(t.stride(d) == expect, op, ": the leading dims of ", name,
                  " must collapse into rows without a copy (call .contiguous()), got ",
                  describe(t));
    }
    expect = t.stride(d) * t.size(d);
  }
  if (stride < 0) return t.size(-1);  // a single row
  DDA_CHECK(stride >= t.size(-1), op, ": the rows of ", name,
              " overlap (row stride < row length), got ", describe(t));
  return stride;
}

// `out` is written while `in` is read. Refused: the same start address, or an overlap
// that ATen can prove on dense tensors (get_overlap_status); `allow_same` admits `in`
// being exactly `out` (an in-place residual). Overlaps between strided views that start
// elsewhere are not detected.
void check_no_overlap(const at::Tensor &out, const char *oname, const at::Tensor &in, const char *iname,
                      const char *op, bool allow_same = false) {
  const auto st = at::get_overlap_status(out, in);
  const bool same = st == at::MemOverlapStatus::Full && out.sizes() == in.sizes() && out.strides() == in.strides();
  const bool bad = st == at::MemOverlapStatus::Partial || (st == at::MemOverlapStatus::Full && !(allow_same && same)) ||
                   (out.data_ptr() == in.data_ptr() && !(allow_same && same));
  DDA_CHECK(!bad, op, ": ", oname, " must not overlap ", iname, allow_same ? " (unless it is the very same tensor)" : "",
            "; got ", oname, " ", describe(out), " and ", iname, " ", describe(in));
}

// The C ABI's attention sizes are ints: a size beyond 2^31 - 1 is refused by name and value
// (a cast would wrap it, e.g. into a size < 1 or a valid head dim).
void check_int_size(int64_t value, const char *what, const at::Tensor &t, const char *name, const char *op) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  DDA_CHECK(value <= kMax, op, ": ", what, " = ", value,
            " is beyond the largest size the attention kernels take, 2^31 - 1 = ", kMax, "; got ", name, " ",
            describe(t));
}

// q's B, Sq, H and D (q [B, Sq, H, D]) within the int sizes.
void check_q_sizes(const at::Tensor &q, const char *op) {
  const char *what[4] = {"B (q.size(0))", "Sq (q.size(1))", "H (q.size(2))", "D (q.size(3))"};
  for (int i = 0; i < 4; ++i) check_int_size(q.size(i), what[i], q, "q", op);
}

void check_same(const at::Tensor &a, const char *an, const at::Tensor &b, const char *bn,
                const char *op) {
  DDA_CHECK(a.device() == b.device(), op, ": ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
  DDA_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check_dtype(const at::Tensor &t, const char *op, const char *name, bool cpu) {
  const auto st = t.scalar_type();
  if (cpu) {
    DDA_CHECK(st == at::kFloat, op, ": the CPU reference supports float32 only; ", name,
                " has dtype ", st, ". Use .float(), or run on CUDA for float16/bfloat16.");
  } else {
    DDA_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
                ": supported dtypes are float32, float16 and bfloat16; ", name, " has dtype ", st);
  }
}

}  // namespace

void throw_on_error(dda_status st, const char *op) {
  if (st == DDA_OK) return;
  const int code = dda_last_backend_error();
  std::string s = cat(op, " failed: ", dda_status_string(st));
  if (st == DDA_ERR_CUDA || st == DDA_ERR_CUBLAS || st == DDA_ERR_TENSOR_MAP)
    s += cat(" (backend code ", code, ")");
  TORCH_CHECK(false, s);
}

dda_dtype to_dda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DDA_F16;
    case at::kBFloat16: return DDA_BF16;
    default: return DDA_F32;
  }
}

dda_linear_params linear_params(const at::Tensor &x, const at::Tensor &weight,
                                const std::optional<at::Tensor> &bias,
                                const std::optional<at::Tensor> &residual, double alpha,
                                double beta, const at::Tensor &out, bool cpu) {
  const char *op = "dda.linear";
  check_dtype(x, op, "x", cpu);
  check_same(x, "x", weight, "weight", op);
  check_same(x, "x", out, "out", op);
  DDA_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got ",
              describe(weight));
  DDA_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got ", describe(weight));
  DDA_CHECK(x.dim() >= 2 && x.size(-1) == weight.size(1), op, ": x [..., K] must match weight [N, K] = ",
              weight.sizes(), ", got x ", describe(x));
  DDA_CHECK(x.numel() > 0, op, ": x is empty (", describe(x), "); nothing to compute");
  const int64_t N = weight.size(0), K = weight.size(1), M = x.numel() / K;
  auto expected = x.sizes().vec();
  expected.back() = N;
  DDA_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out must have shape ", expected,
              ", got ", describe(out));
  dda_linear_params p{};
  p.x = x.data_ptr();
  p.w = weight.data_ptr();
  p.y = out.data_ptr();
  p.x_stride_m = row_stride(x, op, "x");
  p.y_stride_m = row_stride(out, op, "out");
  // out is written while x, weight and bias are read: no overlap at all; the residual may
  // be out itself (in place, same layout) but must not partly overlap it.
  check_no_overlap(out, "out", x, "x", op);
  check_no_overlap(out, "out", weight, "weight", op);
  if (bias) {
    check_same(x, "x", *bias, "bias", op);
    check_no_overlap(out, "out", *bias, "bias", op);
    DDA_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), op,
                ": bias must be a contiguous [", N, "] tensor, got ", describe(*bias));
    p.bias = bias->data_ptr();
  }
  if (residual) {
    check_same(x, "x", *residual, "residual", op);
    DDA_CHECK(residual->sizes() == at::IntArrayRef(expected), op, ": residual must have shape ",
                expected, ", got ", describe(*residual));
    check_no_overlap(out, "out", *residual, "residual", op, true);
    p.residual = residual->data_ptr();
    p.residual_stride_m = row_stride(*residual, op, "residual");
  }
  p.M = M;
  p.N = N;
  p.K = K;
  p.alpha = static_cast<float>(alpha);
  p.beta = static_cast<float>(beta);
  p.dtype = to_dda_dtype(x.scalar_type());
  return p;
}

// The value of an attention enum (backend, precision) that `name` names, or a c10::Error that
// lists the `count` names.
template <typename E>
E named_value(c10::string_view name, const char *what, int count, dda_status (*from_name)(const char *, E *),
              const char *(*name_of)(E)) {
  const std::string s(name.data(), name.size());
  E value{};
  if (from_name(s.c_str(), &value) == DDA_OK) return value;
  std::string names;
  for (int i = 0; i < count; ++i) names += cat(i ? ", \"" : "\"", name_of(static_cast<E>(i)), "\"");
  DDA_CHECK(false, "dda.attention: unknown ", what, " \"", s, "\"; the ", what, "s are ", names);
  return value;
}

dda_attention_params attention_params(const at::Tensor &q, const at::Tensor &k,
                                      const at::Tensor &v, const std::optional<at::Tensor> &mask,
                                      double scale, const at::Tensor &out,
                                      const std::optional<at::Tensor> &lse, bool cpu,
                                      c10::string_view backend, c10::string_view precision) {
  const char *op = "dda.attention";
  const dda_attention_backend backend_value = named_value(backend, "backend", DDA_ATTN_NUM_BACKENDS,
                                                          &dda_attention_backend_from_name, &dda_attention_backend_name);
  const dda_attention_precision precision_value = named_value(
      precision, "precision", DDA_PRECISION_NUM, &dda_attention_precision_from_name, &dda_attention_precision_name);
  check_dtype(q, op, "q", cpu);
  check_same(q, "q", k, "k", op);
  check_same(q, "q", v, "v", op);
  check_same(q, "q", out, "out", op);
  DDA_CHECK(q.dim() == 4, op, ": q must be [B, Sq, H, D], got ", describe(q));
  DDA_CHECK(k.dim() == 4, op, ": k must be [B, Sk, H, D], got ", describe(k));
  DDA_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", describe(v));
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Sk = k.size(1);
  check_q_sizes(q, op);
  check_int_size(Sk, "Sk (k.size(1))", k, "k", op);
  DDA_CHECK(k.size(0) == B && k.size(2) == H && k.size(3) == D, op,
              ": k [B, Sk, H, D] must match q's batch, heads and head dim (", B, ", ", H, ", ", D,
              "), got ", describe(k));
  DDA_CHECK(q.numel() > 0 && k.numel() > 0, op, ": empty input (q ", describe(q), ", k ",
              describe(k), ")");
  for (const at::Tensor *t : {&q, &k, &v, &out}) {
    DDA_CHECK(t->stride(3) == 1, op, ": q, k, v and out must be contiguous in the head dim, got ",
                describe(*t));
  }
  DDA_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ",
              describe(out));
  dda_attention_params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (const auto &[t, name] : {std::pair<const at::Tensor *, const char *>{&q, "q"}, {&k, "k"}, {&v, "v"}})
    check_no_overlap(out, "out", *t, name, op);
  p.o = out.data_ptr();
  p.q_stride_b = q.stride(0); p.q_stride_s = q.stride(1); p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0); p.k_stride_s = k.stride(1); p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0); p.v_stride_s = v.stride(1); p.v_stride_h = v.stride(2);
  p.o_stride_b = out.stride(0); p.o_stride_s = out.stride(1); p.o_stride_h = out.stride(2);
  if (lse) {
    DDA_CHECK(lse->device() == q.device() && lse->scalar_type() == at::kFloat &&
                    lse->sizes() == at::IntArrayRef({B, H, Sq}) && lse->is_contiguous(),
                op, ": lse must be a contiguous float32 [B, H, Sq] = [", B, ", ", H, ", ", Sq,
                "] tensor on q's device, got ", describe(*lse));
    for (const at::Tensor *t : {&q, &k, &v, &out}) check_no_overlap(*lse, "lse", *t, "an input or out", op);
    p.lse = lse->data_ptr<float>();
  }
  p.mask_kind = DDA_MASK_NONE;
  if (mask) {
    const at::Tensor &m = *mask;
    DDA_CHECK(m.device() == q.device(), op, ": mask must be on q's device ", q.device(), ", got ",
                m.device());
    const auto mt = m.scalar_type();
    if (mt == at::kBool) {
      p.mask_kind = DDA_MASK_BOOL;
    } else if (mt == at::kFloat) {
      p.mask_kind = DDA_MASK_ADD_F32;
    } else if (mt == at::kHalf && !cpu) {
      p.mask_kind = DDA_MASK_ADD_F16;
    } else if (mt == at::kBFloat16 && !cpu) {
      p.mask_kind = DDA_MASK_ADD_BF16;
    } else {
      DDA_CHECK(false, op, ": mask must be bool (True = attend) or an additive float mask ",
                  cpu ? "(float32 on CPU)" : "(float32, float16 or bfloat16)", ", got dtype ", mt);
    }
    DDA_CHECK(m.dim() <= 4, op, ": mask must broadcast to [B, H, Sq, Sk] = [", B, ", ", H, ", ",
                Sq, ", ", Sk, "], got ", describe(m));
    const int64_t target[4] = {B, H, Sq, Sk};
    int64_t strides[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < m.dim(); ++i) {
      const int64_t d = 4 - m.dim() + i;
      DDA_CHECK(m.size(i) == target[d] || m.size(i) == 1, op,
                  ": mask must broadcast to [B, H, Sq, Sk] = [", B, ", ", H, ", ", Sq, ", ", Sk,
                  "], got ", describe(m));
      strides[d] = m.size(i) == 1 ? 0 : m.stride(i);
    }
    check_no_overlap(out, "out", m, "mask", op);
    p.mask = m.data_ptr();
    p.mask_stride_b = strides[0];
    p.mask_stride_h = strides[1];
    p.mask_stride_q = strides[2];
    p.mask_stride_k = strides[3];
  }
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Sq = static_cast<int>(Sq);
  p.Sk = static_cast<int>(Sk);
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = to_dda_dtype(q.scalar_type());
  p.backend = backend_value;
  p.precision = precision_value;
  const char *why = dda_attention_check_reason(&p);
  DDA_CHECK(why == nullptr, op, ": ", why ? why : "", "; got q ", describe(q), " and k ", describe(k));
  return p;
}

void throw_unsupported(const char *op, const dda_attention_params &p, const char *why, const at::Tensor &q) {
  if (p.backend == DDA_ATTN_AUTO)
    DDA_CHECK(false, op, ": no attention kernel runs these inputs on this device: ", why ? why : "", "; got q ",
              describe(q));
  DDA_CHECK(false, op, ": backend \"", dda_attention_backend_name(p.backend), "\" cannot run these inputs: ",
            why ? why : "", "; got q ", describe(q));
  TORCH_CHECK(false, op, ": unreachable");
}

std::string attention_refusal(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                              const std::optional<at::Tensor> &mask, c10::string_view backend,
                              c10::string_view precision, bool cpu,
                              const char *(*supported)(const dda_attention_params *)) {
  try {
    const at::Tensor out = attention_query_output(q);
    const dda_attention_params p = attention_params(q, k, v, mask, 1.0, out, std::nullopt, cpu, backend, precision);
    const char *why = supported(&p);
    return why ? why : "";
  } catch (const c10::Error &e) {
    return e.what_without_backtrace();
  }
}

dda_geglu_params geglu_params(const at::Tensor &x, bool approximate, const at::Tensor &out, bool cpu) {
  const char *op = cpu ? "dda.geglu (cpu)" : "dda.geglu (cuda)";
  check_dtype(x, op, "x", cpu);
  check_same(x, "x", out, "out", op);
  DDA_CHECK(x.size(-1) % 2 == 0 && x.size(-1) >= 2, op, ": the last dim of x must be even (value half, gate half), got ",
            describe(x));
  const int64_t N = x.size(-1) / 2;
  auto want = x.sizes().vec();
  want.back() = N;
  DDA_CHECK(out.sizes() == at::IntArrayRef(want), op, ": out must have shape ", want, ", got ", describe(out));
  dda_geglu_params p{};
  p.M = x.numel() / x.size(-1);
  p.N = N;
  DDA_CHECK(p.M >= 1, op, ": x is empty: ", describe(x));
  p.x_stride_m = row_stride(x, op, "x");
  p.y_stride_m = row_stride(out, op, "out");
  check_no_overlap(out, "out", x, "x", op);
  p.x = x.data_ptr();
  p.y = out.data_ptr();
  p.approximate = approximate ? 1 : 0;
  p.dtype = to_dda_dtype(x.scalar_type());
  return p;
}

dda_group_norm_params group_norm_params(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                                        const std::optional<at::Tensor> &bias, double eps, bool silu,
                                        const std::optional<at::Tensor> &shift, const at::Tensor *out_or_null,
                                        bool cpu) {
  const char *op = cpu ? "dda.group_norm (cpu)" : "dda.group_norm (cuda)";
  const at::Tensor &out = out_or_null ? *out_or_null : x;  // a query without an output: x stands in
  check_dtype(x, op, "x", cpu);
  check_same(x, "x", out, "out", op);
  DDA_CHECK(x.dim() == 4 && x.numel() > 0, op, ": x must be a non-empty [N, C, H, W] tensor, got ", describe(x));
  const int64_t C = x.size(1);
  DDA_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                (x.stride(1) == 1 || C == 1),
            op, ": x and out must be channels-last contiguous (x.contiguous(memory_format=torch.channels_last)); got x ",
            describe(x), " and out ", describe(out));
  DDA_CHECK(out.sizes() == x.sizes(), op, ": out must have x's shape, got ", describe(out));
  DDA_CHECK(num_groups >= 1 && C % num_groups == 0, op, ": num_groups (", num_groups, ") must divide the ", C,
            " channels");
  DDA_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  dda_group_norm_params p{};
  const char *names[2] = {"weight", "bias"};
  const std::optional<at::Tensor> *affine[2] = {&weight, &bias};
  const void *ptrs[2] = {nullptr, nullptr};
  for (int i = 0; i < 2; ++i) {
    if (!affine[i]->has_value()) continue;
    const at::Tensor &t = affine[i]->value();
    check_same(x, "x", t, names[i], op);
    DDA_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", names[i],
              " must be a contiguous [C] tensor with C = ", C, ", got ", describe(t));
    ptrs[i] = t.data_ptr();
  }
  // shift: [N, C] or [N, C, 1, 1] (a ResnetBlock2D's time embedding), channels contiguous
  const void *shift_ptr = nullptr;
  int64_t shift_stride_n = 0;
  if (shift.has_value()) {
    const at::Tensor &t = shift.value();
    check_same(x, "x", t, "shift", op);
    const bool shape_ok = (t.dim() == 2 || (t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1)) &&
                          t.size(0) == x.size(0) && t.size(1) == C;
    DDA_CHECK(shape_ok && (t.stride(1) == 1 || C == 1), op, ": shift must be [N, C] or [N, C, 1, 1] with N = ",
              x.size(0), ", C = ", C, " and contiguous channels, got ", describe(t));
    shift_ptr = t.data_ptr();
    shift_stride_n = t.size(0) == 1 ? 0 : t.stride(0);  // 0: one row for every sample (expand)
  }
  if (out_or_null) check_no_overlap(out, "out", x, "x", op);
  p.x = x.data_ptr();
  p.y = out.data_ptr();
  p.gamma = ptrs[0];
  p.beta = ptrs[1];
  p.shift = shift_ptr;
  p.shift_stride_n = shift_stride_n;
  p.N = x.size(0);
  p.C = C;
  p.HW = x.size(2) * x.size(3);
  p.x_stride_n = x.size(0) == 1 ? p.HW * C : x.stride(0);
  p.y_stride_n = out.size(0) == 1 ? p.HW * C : out.stride(0);
  p.G = static_cast<int>(num_groups);
  p.eps = static_cast<float>(eps);
  p.silu = silu ? 1 : 0;
  p.dtype = to_dda_dtype(x.scalar_type());
  return p;
}

dda_low_rank_params low_rank_params(const at::Tensor &t, const at::Tensor &factors, at::TensorList b,
                                    at::IntArrayRef r0, at::IntArrayRef r1, at::IntArrayRef col0, double alpha,
                                    const at::Tensor &out, bool cpu) {
  const char *op = cpu ? "dda.low_rank_accumulate (cpu)" : "dda.low_rank_accumulate (cuda)";
  const auto dt = t.scalar_type();
  if (cpu) {
    DDA_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": t must be float32, float16 or bfloat16, got ", describe(t));
  } else {
    DDA_CHECK(dt == at::kHalf || dt == at::kBFloat16, op,
              ": the CUDA kernel takes float16 or bfloat16 (tensor cores); t has dtype ", dt,
              ". Use .half() / .bfloat16(), or CPU tensors for the float32 reference.");
  }
  check_same(t, "t", out, "out", op);
  const size_t S = b.size();
  DDA_CHECK(r0.size() == S && r1.size() == S && col0.size() == S, op,
            ": b, r0, r1 and col0 need one entry per segment, got ", S, ", ", r0.size(), ", ", r1.size(), " and ",
            col0.size(), " entries");
  DDA_CHECK(S >= 1 && S <= DDA_LOW_RANK_MAX_SEGMENTS, op, ": takes 1 to ", DDA_LOW_RANK_MAX_SEGMENTS,
            " segments per call, got ", S, " (split the call by target columns)");
  DDA_CHECK(t.dim() >= 2 && t.size(-1) >= 1, op, ": t must be [..., R] with R >= 1, got ", describe(t));
  DDA_CHECK(out.dim() >= 2 && out.size(-1) >= 1, op, ": out must be [..., N] with N >= 1, got ", describe(out));
  const int64_t R = t.size(-1), N = out.size(-1);
  const int64_t M = t.numel() / R;
  DDA_CHECK(out.numel() / N == M, op, ": t [..., R] and out [..., N] must have the same number of rows, got t ",
            describe(t), " (", M, " rows) and out ", describe(out), " (", out.numel() / N, " rows)");
  DDA_CHECK(factors.device() == t.device() && factors.scalar_type() == at::kFloat && factors.dim() == 1 &&
                factors.size(0) == R && factors.is_contiguous(),
            op, ": factors must be a contiguous float32 [R] = [", R, "] tensor on t's device ", t.device(), ", got ",
            describe(factors));
  dda_low_rank_params p{};
  for (size_t s = 0; s < S; ++s) {
    const at::Tensor &bs = b[s];
    const std::string name = cat("b[", s, "]");
    check_same(t, "t", bs, name.c_str(), op);
    DDA_CHECK(r0[s] >= 0 && r0[s] < r1[s] && r1[s] <= R, op, ": segment ", s, " has ranks [r0, r1) = [", r0[s],
              ", ", r1[s], ") but t has R = ", R, " (need 0 <= r0 < r1 <= R)");
    DDA_CHECK(bs.dim() == 2 && bs.size(0) >= 1 && bs.size(1) == r1[s] - r0[s], op, ": ", name,
              " must be [n, r1 - r0] = [n, ", r1[s] - r0[s], "] with n >= 1 (torch Linear layout), got ",
              describe(bs));
    DDA_CHECK(bs.is_contiguous(), op, ": ", name, " must be contiguous, got ", describe(bs));
    const int64_t n = bs.size(0);
    DDA_CHECK(col0[s] >= 0 && col0[s] + n <= N, op, ": segment ", s, " writes columns [col0, col0 + n) = [",
              col0[s], ", ", col0[s] + n, ") but out has N = ", N, " columns, got out ", describe(out));
    for (size_t u = 0; u < s; ++u) {
      const int64_t nu = b[u].size(0);
      const bool same = col0[u] == col0[s] && nu == n;
      DDA_CHECK(same || col0[s] + n <= col0[u] || col0[u] + nu <= col0[s], op, ": segments ", u, " (columns [",
                col0[u], ", ", col0[u] + nu, ")) and ", s, " (columns [", col0[s], ", ", col0[s] + n,
                ")) overlap without being the same target; segments that add to the same columns must have "
                "the same col0 and n");
    }
    dda_low_rank_segment &seg = p.segments[s];
    seg.b = bs.data_ptr();
    seg.r0 = r0[s];
    seg.r1 = r1[s];
    seg.col0 = col0[s];
    seg.n = n;
  }
  p.num_segments = static_cast<int>(S);
  p.M = M;
  p.R = R;
  p.N = N;
  p.alpha = static_cast<float>(alpha);
  p.dtype = to_dda_dtype(dt);
  if (M == 0) return p;  // nothing to add (and empty tensors may share a null pointer)
  p.t_stride = row_stride(t, op, "t");
  p.out_stride = row_stride(out, op, "out");
  check_no_overlap(out, "out", t, "t", op);
  check_no_overlap(out, "out", factors, "factors", op);
  for (size_t s = 0; s < S; ++s) check_no_overlap(out, "out", b[s], cat("b[", s, "]").c_str(), op);
  p.t = t.data_ptr();
  p.factors = factors.data_ptr<float>();
  p.out = out.data_ptr();
  const char *why = dda_low_rank_check_reason(&p);
  DDA_CHECK(why == nullptr, op, ": ", why ? why : "", "; got t ", describe(t), " and out ", describe(out));
  return p;
}

std::string group_norm_refusal(const at::Tensor &x, int64_t num_groups, const std::optional<at::Tensor> &weight,
                               const std::optional<at::Tensor> &bias, const std::optional<at::Tensor> &shift, bool cpu,
                               const char *(*supported)(const dda_group_norm_params *)) {
  try {
    const dda_group_norm_params p = group_norm_params(x, num_groups, weight, bias, 1e-5, false, shift, nullptr, cpu);
    const char *why = supported(&p);
    return why ? why : "";
  } catch (const c10::Error &e) {
    return e.what_without_backtrace();
  }
}

at::Tensor geglu_output(const at::Tensor &x) {
  auto sizes = x.sizes().vec();
  if (sizes.empty()) return at::empty({0}, x.options());  // 0-d: geglu_params rejects it
  sizes.back() /= 2;
  return at::empty(sizes, x.options());
}

at::Tensor group_norm_output(const at::Tensor &x) {
  if (x.dim() != 4) return at::empty_like(x);  // group_norm_params rejects it
  return at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
}

at::Tensor linear_output(const at::Tensor &x, const at::Tensor &weight) {
  auto sizes = x.sizes().vec();
  if (sizes.empty()) return at::empty({0}, x.options());  // a 0-d x: linear_params rejects it
  sizes.back() = weight.dim() == 2 ? weight.size(0) : 0;
  return at::empty(sizes, x.options());
}

at::Tensor attention_output(const at::Tensor &q) {
  if (q.dim() == 4) check_q_sizes(q, "dda.attention");  // before allocating B * Sq * H * D elements
  return at::empty(q.sizes(), q.options());
}

at::Tensor attention_query_output(const at::Tensor &q) {
  if (q.dim() != 4) return at::empty(q.sizes(), q.options());  // attention_params rejects it
  check_q_sizes(q, "dda.attention");
  return at::empty({1, 1, 1, q.size(3)}, q.options()).expand(q.sizes());
}

at::Tensor attention_lse(const at::Tensor &q, bool return_lse) {
  if (!return_lse || q.dim() != 4) return at::empty({0}, q.options().dtype(at::kFloat));
  return at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
}

}  // namespace dda_glue
