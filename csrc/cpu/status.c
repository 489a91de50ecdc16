/* status.c: status names and the per-thread backend error code. */
#include "dda.h"

/* __thread is understood by gcc/clang as C and as C++. */
static __thread int g_backend_error = 0;

void dda_set_backend_error(int code) { g_backend_error = code; }

int dda_last_backend_error(void) { return g_backend_error; }

const char *dda_status_string(dda_status s) {
  switch (s) {
    case DDA_OK: return "ok";
    case DDA_ERR_INVALID_ARGUMENT: return "invalid argument (null pointer, size < 1 or bad stride)";
    case DDA_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype for this backend";
    case DDA_ERR_UNSUPPORTED_HEAD_DIM: return "unsupported head dim (must be a multiple of 8 in [8, 512])";
    case DDA_ERR_OUT_OF_MEMORY: return "out of host memory";
    case DDA_ERR_CUDA: return "CUDA runtime error";
    case DDA_ERR_CUBLAS: return "cuBLASLt error";
    case DDA_ERR_NOT_BUILT: return "deepspeed_diffusers_attn was built without CUDA";
    case DDA_ERR_UNPLANNED_IN_CAPTURE:
      return "this GEMM shape was first seen during CUDA-graph capture; run the same call once "
             "eagerly (warm-up) before capturing";
    case DDA_ERR_UNSUPPORTED:
      return "no attention kernel of the requested backend runs these inputs on this device";
    case DDA_ERR_GRID_LIMIT:
      return "the kernel would need more than 2^31 - 1 = 2147483647 thread blocks in one launch "
             "(the CUDA grid limit)";
    case DDA_ERR_TENSOR_MAP:
      return "the CUDA driver refused a TMA tensor map of q, k or v (cuTensorMapEncodeTiled)";
  }
  return "unknown status";
}
