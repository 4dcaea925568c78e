// CUDA kernels of sample_perturb, cem_update and the raw stream (philox_normal, philox_bits).
//
// Torch-free on purpose: raw pointers and the C structs of ops_cuda.h, extern "C" launchers
// taking the stream as void*, so this file compiles with plain nvcc (CI's check:
// nvcc -gencode=arch=compute_90,code=sm_90 -c ops_cuda.cu) and bind_cuda.cpp binds it to torch
// where torch has CUDA. Build with --fmad=false and without --use_fast_math: the float32
// arithmetic is then rounded as the PyTorch reference rounds it, and logf/sincosf/sqrtf are
// CUDA's accurate versions (the normals differ from the reference only by their ulps).
//
// Layout of the work: a thread block of kThreads threads covers kThreads * 4 elements of one
// row; each thread owns one Philox group (4 consecutive elements: one Philox call, two
// Box-Muller pairs) and loops over candidates (sample_perturb) or elites (cem_update). Program
// ids run in a grid-stride loop, so any size fits the grid limits. cem_update's grid is 2-D,
// (element block, row): a block stages its row's elite indices in shared memory once and draws
// two elites per step, two independent Philox chains per thread.
//
// sin and cos of the Box-Muller angle (in [0, 2 pi]) share one Cody-Waite range reduction
// (sincos_0_2pi, the Cephes polynomials of the C++ CPU ops, bit for bit the same under
// --fmad=false): no slow path for large arguments, which the angle never needs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops_cuda.h"
#include "philox.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = 4 * kThreads;
constexpr int64_t kMaxGrid = int64_t{1} << 30;
constexpr int64_t kTargetPrograms = 1024;  // a few waves on ~132 SMs before splitting K

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float load_f(const void* p, int32_t dtype, int64_t i) {
  switch (dtype) {
    case SGF_F32:
      return static_cast<const float*>(p)[i];
    case SGF_BF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case SGF_F16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<float>(static_cast<const double*>(p)[i]);
  }
}

__device__ __forceinline__ void store_f(void* p, int32_t dtype, int64_t i, float v) {
  switch (dtype) {
    case SGF_F32:
      static_cast<float*>(p)[i] = v;
      break;
    case SGF_BF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
  }
}

//! out[base : base + valid] = v[0 : valid]: one vector store when all four are in range and
//! the address is aligned for it, else element by element.
__device__ __forceinline__ void store4(void* out, int32_t dtype, int64_t base, int64_t valid,
                                       const float v[4]) {
  const int64_t item = dtype == SGF_F32 ? 4 : 2;
  const auto address = reinterpret_cast<uintptr_t>(static_cast<char*>(out) + base * item);
  if (valid == 4 && address % (4 * item) == 0) {
    if (dtype == SGF_F32) {
      reinterpret_cast<float4*>(static_cast<float*>(out) + base)[0] =
          make_float4(v[0], v[1], v[2], v[3]);
      return;
    }
    if (dtype == SGF_BF16) {
      __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]);
      __nv_bfloat162 hi = __floats2bfloat162_rn(v[2], v[3]);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(out) + base)[0] = packed;
      return;
    }
    if (dtype == SGF_F16) {
      __half2 lo = __floats2half2_rn(v[0], v[1]);
      __half2 hi = __floats2half2_rn(v[2], v[3]);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      reinterpret_cast<uint2*>(static_cast<__half*>(out) + base)[0] = packed;
      return;
    }
  }
  for (int w = 0; w < 4; ++w) {
    if (w < valid) store_f(out, dtype, base + w, v[w]);
  }
}

__device__ __forceinline__ float param_at(const SgfParam& p, int64_t b, int64_t e) {
  if (p.mode == SGF_SCALAR) return p.value;
  if (p.mode == SGF_ROW) return load_f(p.data, p.dtype, b * p.stride_b);
  return load_f(p.data, p.dtype, b * p.stride_b + e * p.stride_e);
}

__device__ __forceinline__ sgf::StreamKey load_key(const SgfKeyArgs& k) {
  sgf::StreamKey key;
  if (k.seed_ptr != nullptr) {
    const uint64_t s = static_cast<uint64_t>(*k.seed_ptr);
    key.k0 = static_cast<uint32_t>(s);
    key.k1 = static_cast<uint32_t>(s >> 32);
  } else {
    key.k0 = k.seed_lo;
    key.k1 = k.seed_hi;
  }
  key.round = k.round_ptr != nullptr ? static_cast<uint32_t>(*k.round_ptr) : k.round_val;
  key.row_offset = k.row_offset_ptr != nullptr ? static_cast<uint32_t>(*k.row_offset_ptr)
                                               : k.row_offset_val;
  return key;
}

//! sin x and cos x for x in [0, 2 pi]: Cephes sinf/cosf, three-part Cody-Waite reduction
//! (the sincos_0_2pi of cpu_kernels.inc).
__device__ __forceinline__ void sincos_0_2pi(float x, float* s, float* c) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // x / (pi / 4), truncated
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;  // x - j pi / 4, in [-pi / 4, pi / 4]
  const float z = r * r;
  const float ps = ((-1.9515295891E-4f * z + 8.3321608736E-3f) * z - 1.6666654611E-1f) * z * r + r;
  const float pc = ((2.443315711809948E-5f * z - 1.388731625493765E-3f) * z +
                    4.166664568298827E-2f) * z * z -
                   0.5f * z + 1.0f;
  const int32_t q = j >> 1;  // quadrant, 0..4
  const bool swap = (q & 1) != 0;
  const float sv = swap ? pc : ps;
  const float cv = swap ? ps : pc;
  *s = (q & 2) != 0 ? -sv : sv;
  *c = ((q + 1) & 2) != 0 ? -cv : cv;
}

__device__ __forceinline__ void box_muller(uint32_t xa, uint32_t xb, float& n0, float& n1) {
  const float r = sqrtf(-2.0f * logf(sgf::uniform01(xa)));
  float s, c;
  sincos_0_2pi(sgf::uniform01(xb) * sgf::kTwoPiF32, &s, &c);
  n0 = r * c;
  n1 = r * s;
}

//! The four normals of group g (elements 4g .. 4g+3) of (row b of the call, candidate j): the
//! stream's row word is b + the row offset.
__device__ __forceinline__ void normals4(float n[4], uint32_t g, uint32_t j, int64_t b,
                                         const sgf::StreamKey& key) {
  const sgf::Words4 w =
      sgf::philox4x32_10(g, j, sgf::row_word(key, b), key.round, key.k0, key.k1);
  box_muller(w.x0, w.x1, n[0], n[1]);
  box_muller(w.x2, w.x3, n[2], n[3]);
}

__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // shared is reused across grid-stride iterations
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  return total;  // valid in thread 0
}

// ------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    sample_perturb_kernel(SgfSamplePerturbArgs a, int64_t n_blocks, int64_t n_chunks,
                          int64_t per_chunk, int64_t n_programs) {
  const sgf::StreamKey key = load_key(a.key);
  for (int64_t pid = blockIdx.x; pid < n_programs; pid += gridDim.x) {
    const int64_t blk = pid % n_blocks;
    const int64_t chunk = (pid / n_blocks) % n_chunks;
    const int64_t b = pid / (n_blocks * n_chunks);
    const int64_t g = blk * kThreads + threadIdx.x;
    const int64_t e0 = 4 * g;
    if (e0 >= a.d) continue;
    const int64_t valid = min64(4, a.d - e0);
    float mean[4], mu[4], sigma[4];
    for (int w = 0; w < 4; ++w) {
      const int64_t e = w < valid ? e0 + w : e0;
      mean[w] = load_f(a.mean, a.mean_dtype, b * a.mean_stride_b + e * a.mean_stride_e);
      mu[w] = param_at(a.mu, b, e);
      sigma[w] = param_at(a.sigma, b, e);
    }
    const float scale = param_at(a.scale, b, 0);
    const int64_t j_end = min64(chunk * per_chunk + per_chunk, a.k);
    for (int64_t j = chunk * per_chunk; j < j_end; ++j) {
      float n[4], z[4];
      normals4(n, static_cast<uint32_t>(g), static_cast<uint32_t>(j), b, key);
      for (int w = 0; w < 4; ++w) z[w] = mean[w] + scale * (mu[w] + sigma[w] * n[w]);
      store4(a.out, a.out_dtype, (b * a.k + j) * a.d + e0, valid, z);
    }
  }
}

constexpr int kIdxStage = 256;  // elite indices staged in shared memory at a time

__device__ __forceinline__ int64_t elite_at(const SgfCemUpdateArgs& a, int64_t b, int64_t i) {
  const int64_t at = b * a.idx_stride_b + i * a.idx_stride_t;
  return a.idx_is_int32 ? static_cast<const int32_t*>(a.elite_idx)[at]
                        : static_cast<const int64_t*>(a.elite_idx)[at];
}

//! s1 += d, s2 += d^2 with d = n - c, element by element.
__device__ __forceinline__ void accumulate(float s1[4], float s2[4], const float n[4],
                                           const float c[4]) {
  for (int w = 0; w < 4; ++w) {
    const float d = n[w] - c[w];
    s1[w] += d;
    s2[w] += d * d;
  }
}

// 5 blocks an SM: at most 48 registers a thread (62 uncapped, 4 blocks), no spill, the same
// hot loop (sm_90, nvcc 13.0; benchmarks/RESULTS.md, issue 22).
__global__ void __launch_bounds__(kThreads, 5)
    cem_update_kernel(SgfCemUpdateArgs a, int64_t n_blocks, double* var_part) {
  __shared__ double shared[kThreads / 32];
  __shared__ int64_t idx_s[kIdxStage];
  const sgf::StreamKey key = load_key(a.key);
  const float nan = __int_as_float(0x7FC00000);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    // The elites used: the first counts[b] (a count outside [0, T] marks the row bad).
    const int64_t count = a.counts != nullptr ? a.counts[b * a.counts_stride] : a.t;
    const int64_t used = count < 0 ? 0 : (count > a.t ? a.t : count);
    const bool unchanged = count == 0;  // no elite: mu and sigma unchanged, no floor
    for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
      const int64_t g = blk * kThreads + threadIdx.x;
      const int64_t e0 = 4 * g;
      const int64_t valid = e0 < a.d ? min64(4, a.d - e0) : 0;
      bool bad = count < 0 || count > a.t;
      // Sums over the elites of d = n - c and d^2, n the standard normals and c the first
      // elite's (a shift that keeps s2 - s1^2 / t free of cancellation); eps = mu + sigma n is
      // formed once at the end.
      float s1[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s2[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (used > 0) {
        const int64_t j0 = elite_at(a, b, 0);
        bad = bad || j0 < 0 || j0 >= a.k;
        if (valid > 0) normals4(c, static_cast<uint32_t>(g), static_cast<uint32_t>(j0), b, key);
      }
      for (int64_t i0 = 1; i0 < used; i0 += kIdxStage) {
        const int64_t n_stage = min64(kIdxStage, used - i0);
        __syncthreads();  // the previous stage is consumed
        for (int64_t i = threadIdx.x; i < n_stage; i += kThreads) idx_s[i] = elite_at(a, b, i0 + i);
        __syncthreads();
        for (int64_t i = 0; i < n_stage; ++i) bad = bad || idx_s[i] < 0 || idx_s[i] >= a.k;
        if (valid == 0) continue;
        int64_t i = 0;
        for (; i + 1 < n_stage; i += 2) {  // two independent Philox chains a step
          float n_a[4], n_b[4];
          normals4(n_a, static_cast<uint32_t>(g), static_cast<uint32_t>(idx_s[i]), b, key);
          normals4(n_b, static_cast<uint32_t>(g), static_cast<uint32_t>(idx_s[i + 1]), b, key);
          accumulate(s1, s2, n_a, c);
          accumulate(s1, s2, n_b, c);
        }
        if (i < n_stage) {
          float n_a[4];
          normals4(n_a, static_cast<uint32_t>(g), static_cast<uint32_t>(idx_s[i]), b, key);
          accumulate(s1, s2, n_a, c);
        }
      }
      const float t = static_cast<float>(used > 0 ? used : 1);  // a row of no elite: no 0 / 0
      float mu_new[4], sigma_new[4];
      double part = 0.0;
      for (int w = 0; w < 4; ++w) {
        const int64_t e = w < valid ? e0 + w : 0;
        const float mu = param_at(a.mu, b, e);
        const float sigma = param_at(a.sigma, b, e);
        const float mean_n = c[w] + s1[w] / t;
        const float d = s2[w] - (s1[w] * s1[w]) / t;  // shift-invariant; 0 for one elite
        const float var_n = d > 0.0f ? d / t : 0.0f;
        const float m = a.one_minus_alpha * mu + a.alpha * (mu + sigma * mean_n);
        mu_new[w] = bad ? nan : (unchanged ? mu : m);
        const float s = a.one_minus_alpha * sigma + a.alpha * (sigma * sqrtf(var_n));
        const float floored = s < a.min_sigma ? a.min_sigma : s;  // NaN s stays NaN
        sigma_new[w] = bad ? nan : (unchanged ? sigma : floored);
        if (w < valid) part += static_cast<double>(var_n);
      }
      if (valid > 0) {
        store4(a.mu_out, SGF_F32, b * a.d + e0, valid, mu_new);
        if (a.per_element) store4(a.sigma_out, SGF_F32, b * a.d + e0, valid, sigma_new);
      }
      if (!a.per_element) {
        const double total = block_sum(part, shared);
        if (threadIdx.x == 0) var_part[b * n_blocks + blk] = bad ? static_cast<double>(nan) : total;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    cem_pool_kernel(SgfCemUpdateArgs a, int64_t n_blocks, const double* var_part) {
  __shared__ double shared[kThreads / 32];
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < n_blocks; i += kThreads) sum += var_part[b * n_blocks + i];
    const double total = block_sum(sum, shared);
    if (threadIdx.x == 0) {
      const float sigma = param_at(a.sigma, b, 0);  // one value per row when pooled
      const float var_n = static_cast<float>(total / static_cast<double>(a.d));
      const float s = a.one_minus_alpha * sigma + a.alpha * (sigma * sqrtf(var_n));
      const bool unchanged = a.counts != nullptr && a.counts[b * a.counts_stride] == 0;
      // NaN (a bad row) stays NaN; a row with no elite keeps its sigma
      a.sigma_out[b] = unchanged ? sigma : (s < a.min_sigma ? a.min_sigma : s);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(float* out, int64_t k, int64_t d, int64_t n_blocks, int64_t n_programs,
                         SgfKeyArgs key_args) {
  const sgf::StreamKey key = load_key(key_args);
  for (int64_t pid = blockIdx.x; pid < n_programs; pid += gridDim.x) {
    const int64_t blk = pid % n_blocks;
    const int64_t slice = pid / n_blocks;  // b * k + j
    const int64_t g = blk * kThreads + threadIdx.x;
    const int64_t e0 = 4 * g;
    if (e0 >= d) continue;
    float n[4];
    normals4(n, static_cast<uint32_t>(g), static_cast<uint32_t>(slice % k), slice / k, key);
    store4(out, SGF_F32, slice * d + e0, min64(4, d - e0), n);
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_bits_kernel(int64_t* out, const int64_t* counters, int64_t n, uint32_t k0,
                       uint32_t k1) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kThreads) {
    const int64_t* c = counters + 4 * i;
    const sgf::Words4 w =
        sgf::philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                           static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3]), k0, k1);
    out[4 * i] = w.x0;
    out[4 * i + 1] = w.x1;
    out[4 * i + 2] = w.x2;
    out[4 * i + 3] = w.x3;
  }
}

unsigned grid_for(int64_t n_programs) {
  return static_cast<unsigned>(min64(n_programs < 1 ? 1 : n_programs, kMaxGrid));
}

}  // namespace

extern "C" {

size_t sgf_cuda_cem_update_workspace(int64_t batch, int64_t d) {
  return static_cast<size_t>(batch * cdiv(d, kBlockElems)) * sizeof(double);
}

int sgf_cuda_sample_perturb(const SgfSamplePerturbArgs* args, void* stream) {
  const SgfSamplePerturbArgs& a = *args;
  if (a.batch * a.k * a.d == 0) return 0;
  const int64_t n_blocks = cdiv(a.d, kBlockElems);
  const int64_t base = a.batch * n_blocks;
  const int64_t chunks = base >= kTargetPrograms ? 1 : min64(a.k, cdiv(kTargetPrograms, base));
  const int64_t per_chunk = cdiv(a.k, chunks);
  const int64_t n_chunks = cdiv(a.k, per_chunk);
  const int64_t n_programs = base * n_chunks;
  sample_perturb_kernel<<<grid_for(n_programs), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, n_blocks, n_chunks, per_chunk, n_programs);
  return static_cast<int>(cudaGetLastError());
}

int sgf_cuda_cem_update(const SgfCemUpdateArgs* args, void* workspace, void* stream) {
  const SgfCemUpdateArgs& a = *args;
  if (a.batch * a.d == 0) return 0;
  const int64_t n_blocks = cdiv(a.d, kBlockElems);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  double* var_part = static_cast<double*>(workspace);
  const dim3 grid(grid_for(n_blocks), static_cast<unsigned>(min64(a.batch, 65535)));
  cem_update_kernel<<<grid, kThreads, 0, s>>>(a, n_blocks, var_part);
  if (!a.per_element) {
    cem_pool_kernel<<<grid_for(a.batch), kThreads, 0, s>>>(a, n_blocks, var_part);
  }
  return static_cast<int>(cudaGetLastError());
}

int sgf_cuda_philox_normal(float* out, int64_t batch, int64_t k, int64_t d, SgfKeyArgs key,
                           void* stream) {
  if (batch * k * d == 0) return 0;
  const int64_t n_blocks = cdiv(d, kBlockElems);
  const int64_t n_programs = batch * k * n_blocks;
  philox_normal_kernel<<<grid_for(n_programs), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      out, k, d, n_blocks, n_programs, key);
  return static_cast<int>(cudaGetLastError());
}

int sgf_cuda_philox_bits(int64_t* out, const int64_t* counters, int64_t n, uint32_t k0,
                         uint32_t k1, void* stream) {
  if (n == 0) return 0;
  philox_bits_kernel<<<grid_for(cdiv(n, kThreads)), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(out, counters, n, k0, k1);
  return static_cast<int>(cudaGetLastError());
}

const char* sgf_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
