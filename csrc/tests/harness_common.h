/* harness_common.h: what the C test harnesses (csrc/tests/*.cu) share. A harness is a test
 * program, not library code: on a CUDA runtime error it prints where and exits with status 2. */
#pragma once

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_CHECK(call)                                                                    \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      exit(2);                                                                              \
    }                                                                                       \
  } while (0)

/* The main of a harness with correctness, capture and benchmark parts: `workspace_bytes` of
 * device memory in *workspace while they run; the benchmark is skipped when the first argument
 * is --no-bench. Prints the verdict from *failures and returns the exit status (0: all passed). */
static inline int harness_main(int argc, char **argv, void **workspace, size_t workspace_bytes,
                               const int *failures, void (*correctness)(), void (*capture)(), void (*bench)()) {
  setvbuf(stdout, NULL, _IOLBF, 0);  /* progress shows even when piped */
  const int run_bench = !(argc > 1 && strcmp(argv[1], "--no-bench") == 0);
  CUDA_CHECK(cudaMalloc(workspace, workspace_bytes));
  correctness();
  capture();
  if (run_bench) bench();
  CUDA_CHECK(cudaFree(*workspace));
  printf("\n%s: %d failure(s)\n", *failures ? "FAILED" : "PASSED", *failures);
  return *failures ? 1 : 0;
}
