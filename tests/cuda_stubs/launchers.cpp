// Stand-ins for the launchers of ops_cuda.cu (linked instead of it where there is no CUDA):
// every launch fails with "stub". See c10/cuda/CUDAStream.h here.
#include "ops_cuda.h"

extern "C" {
size_t sgf_cuda_cem_update_workspace(int64_t, int64_t) { return 8; }
int sgf_cuda_sample_perturb(const SgfSamplePerturbArgs*, void*) { return 1; }
int sgf_cuda_cem_update(const SgfCemUpdateArgs*, void*, void*) { return 1; }
int sgf_cuda_philox_normal(float*, int64_t, int64_t, int64_t, SgfKeyArgs, void*) { return 1; }
int sgf_cuda_philox_bits(int64_t*, const int64_t*, int64_t, uint32_t, uint32_t, void*) {
  return 1;
}
const char* sgf_cuda_error_string(int) { return "stub"; }
}
