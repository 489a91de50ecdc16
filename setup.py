"""Build of deepspeed_diffusers_attn._C.

CUDA is built when FORCE_CUDA=1, when TORCH_CUDA_ARCH_LIST is set, or when a GPU is
visible; otherwise (or with DDA_CPU_ONLY=1) a CPU-only extension is built, and the
build says so loudly. Options (environment):
  TORCH_CUDA_ARCH_LIST  e.g. "9.0a" (H100/H200) or "8.0;9.0a"; default "8.0;9.0a"
  FORCE_CUDA=1          build CUDA even with no GPU visible (CI does this)
  DDA_CPU_ONLY=1        never build CUDA
  DEBUG=1               -O0 -g (and -G for device code)
  MAX_JOBS, NVCC_THREADS  parallel compile jobs / nvcc threads per job
"""
import glob
import os
import shutil
import sys

from setuptools import setup

# torch derives CUDA_HOME from `which nvcc`; where nvcc is a wrapper script outside the
# toolkit (/usr/local/bin/nvcc here), point it at the toolkit itself.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def want_cuda():
    if os.environ.get("DDA_CPU_ONLY", "0") == "1":
        return False, "DDA_CPU_ONLY=1"
    asked = os.environ.get("FORCE_CUDA", "0") == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if not (asked or torch.cuda.is_available()):
        return False, "no GPU visible and neither FORCE_CUDA=1 nor TORCH_CUDA_ARCH_LIST is set"
    if CUDA_HOME is None:
        if asked:
            sys.exit("deepspeed_diffusers_attn: CUDA build requested but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    if torch.version.cuda is None:
        sys.exit("deepspeed_diffusers_attn: CUDA build requested but this torch is a CPU build")
    return True, ""


def find_cublaslt():
    """Include and library dirs holding cublasLt.h / libcublasLt: the toolkit's, else the pip wheel's.

    The wheel's include dir also holds its own partial copy of the CUDA runtime headers,
    which must not shadow the toolkit's: only the two cuBLAS headers are taken from it,
    copied into build/cublas_include."""
    candidates = [(os.path.join(CUDA_HOME, "include"), os.path.join(CUDA_HOME, "lib64"))]
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13", "cublas"):
                candidates.append((os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")))
    except ImportError:
        pass
    for inc, lib in candidates:
        if os.path.exists(os.path.join(inc, "cublasLt.h")):
            libs = sorted(glob.glob(os.path.join(lib, "libcublasLt.so*")))
            if libs:
                plain = os.path.join(lib, "libcublasLt.so")
                name = "cublasLt" if os.path.exists(plain) else ":" + os.path.basename(libs[0])
                if inc != os.path.join(CUDA_HOME, "include"):
                    shim = os.path.join(ROOT, "build", "cublas_include")
                    os.makedirs(shim, exist_ok=True)
                    for h in ("cublasLt.h", "cublas_api.h"):
                        shutil.copy(os.path.join(inc, h), shim)
                    inc = shim
                return inc, lib, name
    sys.exit("deepspeed_diffusers_attn: cublasLt.h / libcublasLt not found in the CUDA toolkit "
             "or the nvidia-cublas wheel")


def extension():
    use_cuda, why_not = want_cuda()
    sources = sorted(glob.glob("csrc/torch/*.cpp")) + sorted(glob.glob("csrc/cpu/*.c"))
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "torch")]
    if not use_cuda:
        print("*" * 78 + f"\n* deepspeed_diffusers_attn: building a CPU-ONLY extension ({why_not}).\n"
              "* The CUDA ops will raise 'built without CUDA'. Set FORCE_CUDA=1 to build them.\n" + "*" * 78)
        sources = [s for s in sources if not s.endswith("cuda_impl.cpp")]
        return CppExtension("deepspeed_diffusers_attn._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, py_limited_api=False)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources = [s for s in sources if not s.endswith("no_cuda.c")] + sorted(glob.glob("csrc/cuda/*.cu"))
    inc, lib, libname = find_cublaslt()
    nvcc = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr",
             # our kernels are torch-free C-style CUDA and use cuda_fp16/bf16 conversions
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    nvcc += ["--threads", os.environ.get("NVCC_THREADS", "2")]
    return CUDAExtension("deepspeed_diffusers_attn._C", sources, include_dirs=include_dirs + [inc],
                         library_dirs=[lib], libraries=[libname],
                         define_macros=[("DDA_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


# Guarded so that tools (.ci/run's harness step) can import find_cublaslt.
if __name__ == "__main__":
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
    )
