/* no_cuda.c: the CUDA entry points of a CPU-only build (DDA_CPU_ONLY=1 or no nvcc).
 * Each says plainly that CUDA was not built, rather than failing to link. */
#include "dda.h"

dda_status dda_linear_cuda(const dda_linear_params *p, void *workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  (void)p; (void)workspace; (void)workspace_bytes; (void)stream;
  return DDA_ERR_NOT_BUILT;
}

dda_status dda_attention_fwd_cuda(const dda_attention_params *p, cudaStream_t stream) {
  (void)p; (void)stream;
  return DDA_ERR_NOT_BUILT;
}

const char *dda_attention_kernel_name(int cc_major, int cc_minor, dda_dtype dtype, int head_dim,
                                      int seq_k) {
  (void)cc_major; (void)cc_minor; (void)dtype; (void)head_dim; (void)seq_k;
  return "unsupported: deepspeed_diffusers_attn was built without CUDA";
}

const char *dda_attention_supported_cuda(const dda_attention_params *p) {
  (void)p;
  return "deepspeed_diffusers_attn was built without CUDA";
}

const char *dda_attention_kernel_for(const dda_attention_params *p) {
  (void)p;
  return "unsupported: deepspeed_diffusers_attn was built without CUDA";
}

dda_status dda_geglu_cuda(const dda_geglu_params *p, cudaStream_t stream) {
  (void)p; (void)stream;
  return DDA_ERR_NOT_BUILT;
}

const char *dda_group_norm_supported_cuda(const dda_group_norm_params *p) {
  (void)p;
  return "deepspeed_diffusers_attn was built without CUDA";
}

size_t dda_group_norm_workspace_bytes(const dda_group_norm_params *p) {
  (void)p;
  return 0;
}

dda_status dda_group_norm_cuda(const dda_group_norm_params *p, void *workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  (void)p; (void)workspace; (void)workspace_bytes; (void)stream;
  return DDA_ERR_NOT_BUILT;
}

const char *dda_low_rank_supported_cuda(const dda_low_rank_params *p) {
  (void)p;
  return "deepspeed_diffusers_attn was built without CUDA";
}

dda_status dda_low_rank_accumulate_cuda(const dda_low_rank_params *p, cudaStream_t stream) {
  (void)p; (void)stream;
  return DDA_ERR_NOT_BUILT;
}
