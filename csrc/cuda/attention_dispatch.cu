/*
 * attention_dispatch.cu: which attention kernel runs. The one selection (select_family)
 * behind dda_attention_fwd_cuda, dda_attention_supported_cuda, dda_attention_kernel_for
 * and dda_attention_kernel_name, and the device facts every family reads.
 *
 * Families (attention_common.cuh's interface, one per attention_fwd_*.cu), in the order
 * the automatic dispatch tries them; it runs the first that takes the inputs (fits the
 * device's shared memory) and prefers them:
 *   short     cc >= 8.0, fp16/bf16, Sk <= 128, D <= 160 (masks too): always preferred
 *   sm90_tma  Hopper + an sm_90a build, unmasked, D 33..80 or 113..128, TMA-able
 *             strides: preferred for Sk > 128
 *   sm90      Hopper + an sm_90a build, D <= 256 (masks too): preferred for padded head
 *             dims 64..128, Sk > 128 and a full wave of blocks
 *   mma       cc >= 8.0, fp16/bf16, D <= 256
 *   d512      cc >= 8.0, fp16/bf16, 256 < D <= 512, sm_80's shared memory
 *   generic   any dtype and alignment: the fallback
 * The tensor-core families need 16-byte compatible q/k/v/o pointers and strides; for
 * fp32 or misaligned inputs only generic takes them. A forced backend runs that family
 * or is refused with its reason, never replaced by another. Every family computes the exact
 * precision: an 8-bit one (dda_attention_precision) is refused.
 * Every family launches one folded 1-D grid (attention_common.cuh), so B * H has no limit
 * of its own; a family whose grid would pass 2^31 - 1 blocks is refused with the count
 * (DDA_ERR_GRID_LIMIT where that is the only obstacle) and auto tries the next.
 */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_set>

#include "attention_common.cuh"
#include "dda.h"
#include "launch_common.cuh"

using dda_attn::DevInfo;
using dda_attn::Family;

/* ------------------------------------------------------- device facts -- */

cudaError_t dda_attn::device_info(DevInfo *out) {
  static DevInfo cache[64];
  static std::atomic<bool> ready[64];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const bool cacheable = dev >= 0 && dev < 64;
  if (cacheable && ready[dev].load(std::memory_order_acquire)) {
    *out = cache[dev];
    return cudaSuccess;
  }
  int major = 0, minor = 0, sms = 0, block = 0, sm = 0;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (e != cudaSuccess) return e;
  const int sm90 = dda_attn::sm90_built();
  if (sm90 < 0) {
    const cudaError_t le = cudaGetLastError();
    return le != cudaSuccess ? le : cudaErrorUnknown;
  }
  const DevInfo d{major, minor, sms > 0 ? sms : 1, static_cast<size_t>(block), static_cast<size_t>(sm), sm90 == 1};
  *out = d;
  if (cacheable) {  /* benign race: every thread writes the same facts */
    cache[dev] = d;
    ready[dev].store(true, std::memory_order_release);
  }
  return cudaSuccess;
}

namespace {

/* ---------------------------------------------------------- selection -- */

/* In the order the automatic dispatch tries them. */
const Family *const kAutoOrder[] = {&dda_attn::kShortFamily, &dda_attn::kSm90TmaFamily, &dda_attn::kSm90Family,
                                    &dda_attn::kMmaFamily,   &dda_attn::kD512Family,    &dda_attn::kGenericFamily};

const Family *family_of(dda_attention_backend b) {
  for (const Family *f : kAutoOrder)
    if (f->backend == b) return f;
  return nullptr;
}

/* A static copy of s: the answers are a small set (reasons, kernel-name lists; grid refusals,
 * which name their sizes, only for launches beyond 2^31 - 1 blocks), so each is stored once
 * for the life of the process and returned by pointer. */
const char *intern(const std::string &s) {
  static std::mutex mu;
  static std::unordered_set<std::string> *strings = new std::unordered_set<std::string>();
  const std::lock_guard<std::mutex> lock(mu);
  return strings->insert(s).first->c_str();
}

/* The refusal of a launch of head_blocks x B x H thread blocks (beyond kMaxGridBlocks), with
 * the sizes behind it. */
const char *grid_refusal(long long head_blocks, const dda_attention_params *p) {
  const long long bh = static_cast<long long>(p->B) * p->H;  /* < 2^62: B and H are ints */
  const bool overflow = head_blocks > 0 && bh > std::numeric_limits<long long>::max() / head_blocks;
  const std::string total = overflow ? "more than 2^63" : std::to_string(head_blocks * bh);
  return intern("needs " + total + " thread blocks in one launch: " + std::to_string(head_blocks) +
                " per (b, h) for Sq = " + std::to_string(p->Sq) + ", times B x H = " + std::to_string(p->B) + " x " +
                std::to_string(p->H) + " = " + std::to_string(bh) +
                "; the CUDA grid limit is 2^31 - 1 = 2147483647 blocks per launch");
}

/* Why f cannot run p on d, or NULL; *st: DDA_ERR_UNSUPPORTED, or DDA_ERR_GRID_LIMIT where
 * only the grid stands in the way. */
const char *refusal(const Family &f, const dda_attention_params *p, const DevInfo &d, dda_status *st) {
  *st = DDA_ERR_UNSUPPORTED;
  if (const char *why = f.unsupported(p, d)) return why;
  if (f.smem(p, d) > d.block_smem) return "needs more shared memory per block than this device has";
  const long long head_blocks = f.head_blocks(p, d);
  if (folded_blocks(head_blocks, p) > kMaxGridBlocks) {
    *st = DDA_ERR_GRID_LIMIT;
    return grid_refusal(head_blocks, p);
  }
  *st = DDA_OK;
  return nullptr;
}

/* The one selection: the family that runs p (checked params) on d, or NULL with *why and
 * *st (DDA_ERR_UNSUPPORTED or DDA_ERR_GRID_LIMIT). */
const Family *select_family(const dda_attention_params *p, const DevInfo &d, const char **why, dda_status *st) {
  *why = nullptr;
  *st = DDA_OK;
  if (p->precision != DDA_PRECISION_EXACT) {
    *st = DDA_ERR_UNSUPPORTED;
    *why = "no CUDA kernel computes the 8-bit precisions (\"int8-qk\", \"fp8\"); the CPU's C reference defines them";
    return nullptr;
  }
  if (p->backend == DDA_ATTN_AUTO) {
    for (const Family *f : kAutoOrder)
      if (refusal(*f, p, d, st) == nullptr && f->preferred(p, d)) return f;
    *why = refusal(dda_attn::kGenericFamily, p, d, st);  /* generic is always preferred: its refusal is the reason */
    return nullptr;
  }
  const Family *f = family_of(p->backend);
  if (f == nullptr) {
    *st = DDA_ERR_UNSUPPORTED;
    *why = p->backend == DDA_ATTN_REFERENCE
               ? "the \"reference\" backend is the CPU's C reference; CUDA tensors run \"auto\" or a CUDA kernel family"
               : "unknown backend";
    return nullptr;
  }
  *why = refusal(*f, p, d, st);
  return *why ? nullptr : f;
}

const char *unsupported_string(const char *why) { return intern(std::string("unsupported: ") + why); }

/* Shared memory per block (opt-in) and per SM by compute capability, for naming
 * kernels of a device that is not at hand. */
void smem_limits_for_cc(int major, int minor, size_t *block, size_t *sm) {
  if (major == 8 && (minor == 0 || minor == 7)) {
    *block = 166912; *sm = 167936;
  } else if (major == 9 || major == 10) {
    *block = 232448; *sm = 233472;
  } else if (major == 7 && minor == 5) {
    *block = 65536; *sm = 65536;
  } else if (major == 7) {
    *block = 98304; *sm = 98304;
  } else {
    *block = 101376; *sm = 102400;
  }
}

}  // namespace

extern "C" dda_status dda_attention_fwd_cuda(const dda_attention_params *p, cudaStream_t stream) {
  const dda_status st = dda_attention_check(p);
  if (st != DDA_OK) return st;
  DevInfo d;
  const cudaError_t e = dda_attn::device_info(&d);
  if (e != cudaSuccess) return cuda_fail(e);
  const char *why = nullptr;
  dda_status refused = DDA_OK;
  const Family *f = select_family(p, d, &why, &refused);
  if (f == nullptr) return refused;
  dda_attention_params run = *p;
  run.scale_log2 = p->scale * kLog2e;
  return f->launch(&run, d, stream);
}

extern "C" const char *dda_attention_supported_cuda(const dda_attention_params *p) {
  if (const char *why = dda_attention_check_reason(p)) return why;
  DevInfo d;
  if (dda_attn::device_info(&d) != cudaSuccess) {
    (void)cudaGetLastError();
    return "a CUDA error while reading the device's attributes";
  }
  const char *why = nullptr;
  dda_status st = DDA_OK;
  select_family(p, d, &why, &st);
  return why;
}

extern "C" const char *dda_attention_kernel_for(const dda_attention_params *p) {
  if (const char *why = dda_attention_check_reason(p)) return unsupported_string(why);
  DevInfo d;
  if (dda_attn::device_info(&d) != cudaSuccess) {
    (void)cudaGetLastError();
    return "unsupported: a CUDA error while reading the device's attributes";
  }
  const char *why = nullptr;
  dda_status st = DDA_OK;
  const Family *f = select_family(p, d, &why, &st);
  return f ? f->kernel(p, d) : unsupported_string(why);
}

extern "C" const char *dda_attention_kernel_name(int cc_major, int cc_minor, dda_dtype dtype, int head_dim,
                                                 int seq_k) {
  if (cc_major < 7) return "unsupported: compute capability below 7.0";
  DevInfo d{};
  int dev = 0, major = -1, minor = -1;
  const bool have = cudaGetDevice(&dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
  if (!have) (void)cudaGetLastError();
  if (!(have && major == cc_major && minor == cc_minor && dda_attn::device_info(&d) == cudaSuccess)) {
    (void)cudaGetLastError();
    d.cc_major = cc_major;
    d.cc_minor = cc_minor;
    d.sms = 132;
    smem_limits_for_cc(cc_major, cc_minor, &d.block_smem, &d.sm_smem);
    d.sm90 = cc_major == 9;
  }
  /* Unmasked, contiguous packed-qkv-like inputs at 16-byte aligned (never read) addresses;
   * one head, with query lengths from one block to several waves of the largest tiles. */
  dda_attention_params p;
  memset(&p, 0, sizeof p);
  p.q = p.k = p.v = reinterpret_cast<const void *>(static_cast<uintptr_t>(256));
  p.o = reinterpret_cast<void *>(static_cast<uintptr_t>(256));
  p.D = head_dim;
  p.B = p.H = 1;
  p.Sk = seq_k;
  const int64_t row = head_dim > 0 ? ((static_cast<int64_t>(head_dim) + 7) / 8) * 8 : 8;
  p.q_stride_h = p.k_stride_h = p.v_stride_h = p.o_stride_h = row;
  p.q_stride_s = p.k_stride_s = p.v_stride_s = p.o_stride_s = row;
  p.dtype = dtype;
  p.scale = 1.0f;
  std::string names;
  const long long sizes[] = {256LL * d.sms, 64LL * d.sms, 16};
  for (long long sq : sizes) {
    p.Sq = static_cast<int>(sq);
    p.q_stride_b = p.k_stride_b = p.v_stride_b = p.o_stride_b = row * (sq > seq_k ? sq : seq_k);
    const char *why = dda_attention_check_reason(&p);
    dda_status st = DDA_OK;
    const Family *f = why ? nullptr : select_family(&p, d, &why, &st);
    if (f == nullptr) return unsupported_string(why);
    const std::string name = f->kernel(&p, d);
    if (("|" + names + "|").find("|" + name + "|") == std::string::npos) names += (names.empty() ? "" : "|") + name;
  }
  return intern(names);
}
