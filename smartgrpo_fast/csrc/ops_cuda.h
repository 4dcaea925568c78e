// C ABI of the CUDA kernels in ops_cuda.cu: raw pointers and plain structs, no torch, so that
// ops_cuda.cu compiles with plain nvcc (bind_cuda.cpp fills these from torch tensors).
//
// Each launcher enqueues its kernels on ``stream`` (a cudaStream_t passed as void*) and returns
// a cudaError_t as int (0 = success; sgf_cuda_error_string names it). Nothing synchronises, and
// seeds, rounds and row offsets may be device pointers, so every launch is CUDA-graph
// capturable.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

//! Storage dtypes of SgfParam::dtype and the tensor arguments.
enum SgfDType { SGF_F32 = 0, SGF_BF16 = 1, SGF_F16 = 2, SGF_F64 = 3 };
//! smartgrpo_fast.ops._common.Mode.
enum SgfMode { SGF_SCALAR = 0, SGF_ROW = 1, SGF_ELEM = 2 };

//! A float parameter: ``value`` (SCALAR), ``data[b * stride_b]`` (ROW) or
//! ``data[b * stride_b + e * stride_e]`` (ELEM), in ``dtype``.
typedef struct {
  const void* data;
  int32_t dtype;
  int32_t mode;
  float value;
  int64_t stride_b;
  int64_t stride_e;
} SgfParam;

//! The seed, round and row offset: read from ``seed_ptr`` / ``round_ptr`` / ``row_offset_ptr``
//! (0-d int64 on the device) when set, else the words ``seed_lo``, ``seed_hi``, ``round_val``,
//! ``row_offset_val``. Row b of a call draws the stream's row word b + row offset.
typedef struct {
  const int64_t* seed_ptr;
  const int64_t* round_ptr;
  const int64_t* row_offset_ptr;
  uint32_t seed_lo;
  uint32_t seed_hi;
  uint32_t round_val;
  uint32_t row_offset_val;
} SgfKeyArgs;

typedef struct {
  void* out;  // contiguous (B, K, D) in out_dtype
  int32_t out_dtype;
  const void* mean;  // (B, D) with strides, in mean_dtype
  int32_t mean_dtype;
  int64_t mean_stride_b;
  int64_t mean_stride_e;
  SgfParam mu;
  SgfParam sigma;
  SgfParam scale;  // SCALAR or ROW
  int64_t batch;
  int64_t k;
  int64_t d;
  SgfKeyArgs key;
} SgfSamplePerturbArgs;

typedef struct {
  float* mu_out;     // contiguous (B, D)
  float* sigma_out;  // contiguous (B, D), or (B,) when per_element == 0
  SgfParam mu;
  SgfParam sigma;  // SCALAR or ROW when per_element == 0
  const void* elite_idx;  // (B, T) int64 (idx_is_int32 == 0) or int32, with strides
  int32_t idx_is_int32;
  int64_t idx_stride_b;
  int64_t idx_stride_t;
  const int64_t* counts;  // (B,) elites used per row, read by the kernels; null: all T
  int64_t counts_stride;
  int64_t batch;
  int64_t k;
  int64_t t;
  int64_t d;
  float alpha;            // float32(alpha)
  float one_minus_alpha;  // float32(1 - alpha)
  float min_sigma;
  int32_t per_element;
  SgfKeyArgs key;
} SgfCemUpdateArgs;

//! Bytes of device workspace sgf_cuda_cem_update needs (the pooled variance partial sums).
size_t sgf_cuda_cem_update_workspace(int64_t batch, int64_t d);

int sgf_cuda_sample_perturb(const SgfSamplePerturbArgs* args, void* stream);
int sgf_cuda_cem_update(const SgfCemUpdateArgs* args, void* workspace, void* stream);
//! out: contiguous (B, K, D) float32 normals of the stream.
int sgf_cuda_philox_normal(float* out, int64_t batch, int64_t k, int64_t d, SgfKeyArgs key,
                           void* stream);
//! out, counters: contiguous (N, 4) int64; words of Philox4x32-10 under key (k0, k1).
int sgf_cuda_philox_bits(int64_t* out, const int64_t* counters, int64_t n, uint32_t k0,
                         uint32_t k1, void* stream);
const char* sgf_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
