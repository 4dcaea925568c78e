// CPU kernels of the fused ops on raw pointers: no torch here (ops_cpu.cpp binds them).
//
// Work is cut into tasks of at most kBlock elements of one row; the caller runs tasks
// [begin, end) on each thread (OpenMP through at::parallel_for). Every kernel exists twice,
// compiled from cpu_kernels.inc for the x86-64 baseline and for AVX2; the AVX2 copy is
// picked at run time when the CPU has it, so a cached build is portable across machines and
// both copies give the same bits (no FMA contraction, the same float32 operations in order).
#pragma once

#include <stdint.h>

#include "philox.h"

namespace sgf::cpu {

//! Elements per task (a multiple of 32: eight 4-element Philox groups per SIMD step).
constexpr int64_t kBlock = 1024;

//! Storage dtypes: loaded and stored as such, every computation in float32.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

//! A (rows, D) view of floats in a storage dtype, with element strides.
struct Strided {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_b = 0;
  int64_t stride_e = 0;
};

//! mu or sigma: one float32 per row (``row``), or per element when ``elem.data`` is set.
struct Param {
  const float* row = nullptr;
  Strided elem;
};

struct SamplePerturbArgs {
  void* out = nullptr;  // contiguous (B, K, D)
  DType out_dtype = DType::kFloat32;
  Strided mean;         // (B, D)
  Param mu;
  Param sigma;
  const float* scale = nullptr;  // (B,)
  int64_t batch = 0, k = 0, d = 0;
  StreamKey key{};
};

struct CemUpdateArgs {
  float* mu_out = nullptr;     // contiguous (B, D)
  float* sigma_out = nullptr;  // contiguous (B, D) when per_element
  double* var_part = nullptr;  // (B, n_blocks) partial sums of the elite variance when pooled
  Param mu;
  Param sigma;
  const int64_t* elite_idx = nullptr;  // contiguous (B, T)
  const int64_t* counts = nullptr;     // contiguous (B,): elites used per row; null: all T
  int64_t batch = 0, k = 0, t = 0, d = 0;
  float alpha = 1.0f;            // float32(alpha)
  float one_minus_alpha = 0.0f;  // float32(1 - alpha), 1 - alpha taken in double
  float min_sigma = 0.0f;
  bool per_element = true;
  StreamKey key{};
};

struct X0EstimateArgs {
  void* out = nullptr;  // contiguous (N, D)
  DType out_dtype = DType::kFloat32;
  Strided z;            // (N, D)
  Strided v;            // (N, D)
  const float* t = nullptr;  // (N,)
  float scaling = 1.0f;
  float shift = 0.0f;
  int64_t rows = 0, d = 0;
};

struct PhiloxNormalArgs {
  float* out = nullptr;  // contiguous (B, K, D)
  int64_t batch = 0, k = 0, d = 0;
  StreamKey key{};
};

//! How sample_perturb's (row, block, candidate chunk) tasks are cut.
struct Tiling {
  int64_t n_blocks = 1;
  int64_t n_chunks = 1;
  int64_t per_chunk = 1;
};

//! Tasks for ``threads`` threads: whole rows of candidates per task unless that leaves fewer
//! than ~4 tasks per thread, then candidates are split into chunks.
Tiling sample_perturb_tiling(int64_t batch, int64_t k, int64_t d, int threads);
int64_t n_blocks(int64_t d);

//! Run tasks [begin, end): sample_perturb over batch * n_blocks * n_chunks tasks; cem_update,
//! x0_estimate over rows * n_blocks(d); philox_normal over batch * k * n_blocks(d).
void sample_perturb(const SamplePerturbArgs& a, const Tiling& tiling, int64_t begin, int64_t end);
void cem_update(const CemUpdateArgs& a, int64_t begin, int64_t end);
void x0_estimate(const X0EstimateArgs& a, int64_t begin, int64_t end);
void philox_normal(const PhiloxNormalArgs& a, int64_t begin, int64_t end);

//! "avx2" or "generic": the kernel copy the calls above run (env SMARTGRPO_CPU_ISA=generic
//! forces the baseline copy, for tests and comparisons).
const char* isa();

}  // namespace sgf::cpu
