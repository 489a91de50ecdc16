// cuda_impl.cpp: the CUDA impls of the dda ops: checks, device guard, the current
// stream, then the C launchers. Never synchronises.
//
// cuBLASLt scratch of dda.linear. dda_linear_cuda takes its workspace from the caller
// (dda.h); this glue keeps one of DDA_LINEAR_WORKSPACE_BYTES (32 MiB) per (device,
// stream), taken from torch's caching allocator on the first eager call on that stream
// and held until the process exits, like torch's own cuBLAS workspaces (one per handle
// and stream). One per stream, because cuBLASLt kernels on two streams must not share
// scratch; reuse on one stream is ordered by the stream itself. The block is allocated
// while its stream is current, so the allocator ties it to that stream, and since it is
// never freed, no record_stream is needed. Never freed also means a CUDA graph may bake
// its address in: a graph captured on stream S reads S's scratch when it replays, so
// replays of such a graph must not run concurrently with other dda.linear work of S
// (the same rule as the attention workspace, deepspeed_diffusers_attn/workspace.py).
//
// During CUDA-graph capture nothing is added to the table (this code never calls
// cudaMalloc; the caching allocator would put a block allocated now in the graph's
// private pool, which must not serve later eager calls):
//   - the capturing stream has a scratch (an eager call ran on it before, as the
//     module's warm-up and graphs.py's do): the graph uses it;
//   - it has none (e.g. warm-up on one stream, capture on another, as in torch's own
//     torch.cuda.graph recipe): this call takes a temporary of the same size from the
//     caching allocator, which serves it from the graph's private pool and takes it
//     back when the call returns, so the graph owns it like its other captured
//     tensors. This is what every call did before the scratch was made persistent.
// linear_scratch_nbytes() reports what the table holds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "dda.h"
#include "glue.h"

namespace {

struct LinearScratch {
  std::mutex mutex;
  std::map<std::pair<c10::DeviceIndex, cudaStream_t>, c10::DataPtr> buffers;
};

LinearScratch &linear_scratch() {
  // Leaked on purpose: freeing the blocks at exit could run after the caching allocator
  // is gone. The driver releases the memory with the process.
  static LinearScratch *s = new LinearScratch();
  return *s;
}

// The persistent scratch of (device, stream), created if missing and not capturing;
// nullptr if missing while `stream` is capturing (the caller then takes a temporary).
void *persistent_scratch(c10::DeviceIndex device, cudaStream_t stream) {
  LinearScratch &s = linear_scratch();
  const auto key = std::make_pair(device, stream);
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.buffers.find(key);
  if (it != s.buffers.end()) return it->second.get();
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;  // plain CUDA: works on torch 2.11 too
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return nullptr;
  c10::DataPtr block = c10::cuda::CUDACachingAllocator::get()->allocate(DDA_LINEAR_WORKSPACE_BYTES);
  return s.buffers.emplace(key, std::move(block)).first->second.get();
}

void linear_out_cuda(const at::Tensor &x, const at::Tensor &weight,
                     const std::optional<at::Tensor> &bias,
                     const std::optional<at::Tensor> &residual, double alpha, double beta,
                     at::Tensor &out) {
  const dda_linear_params p = dda_glue::linear_params(x, weight, bias, residual, alpha, beta, out, false);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  void *scratch = persistent_scratch(x.device().index(), stream);
  at::Tensor temporary;  // only while capturing on a stream without a scratch (see above)
  if (!scratch) {
    temporary = at::empty({static_cast<int64_t>(DDA_LINEAR_WORKSPACE_BYTES)}, x.options().dtype(at::kByte));
    scratch = temporary.data_ptr();
  }
  dda_glue::throw_on_error(dda_linear_cuda(&p, scratch, DDA_LINEAR_WORKSPACE_BYTES, stream),
                           "dda.linear (cuda)");
}

void attention_out_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                        const std::optional<at::Tensor> &mask, double scale, at::Tensor &out,
                        const std::optional<at::Tensor> &lse) {
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, scale, out, lse, false);
  const c10::cuda::CUDAGuard guard(q.device());
  dda_glue::throw_on_error(dda_attention_fwd_cuda(&p, c10::cuda::getCurrentCUDAStream().stream()),
                           "dda.attention (cuda)");
}

// The kernel dda_attention_fwd_cuda would run for these inputs on their device; bad
// inputs raise the same errors as the op itself. Launches nothing.
std::string attention_kernel_for_cuda(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                      const std::optional<at::Tensor> &mask) {
  const at::Tensor out = dda_glue::attention_output(q);
  const dda_attention_params p = dda_glue::attention_params(q, k, v, mask, 1.0, out, std::nullopt, false);
  const c10::cuda::CUDAGuard guard(q.device());
  return dda_attention_kernel_for(&p);
}

}  // namespace

namespace dda_glue {

int64_t linear_scratch_nbytes() {
  LinearScratch &s = linear_scratch();
  std::lock_guard<std::mutex> lock(s.mutex);
  return static_cast<int64_t>(s.buffers.size() * DDA_LINEAR_WORKSPACE_BYTES);
}

}  // namespace dda_glue

TORCH_LIBRARY_IMPL(dda, CUDA, m) {
  m.impl("linear", &dda_glue::linear<&linear_out_cuda>);
  m.impl("linear_out", &linear_out_cuda);
  m.impl("attention", &dda_glue::attention<&attention_out_cuda>);
  m.impl("attention_out", &attention_out_cuda);
  m.impl("attention_kernel_for", &attention_kernel_for_cuda);
}
