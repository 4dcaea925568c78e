// CUDA implementations of the smartgrpo_fast ops: torch tensors -> the C ABI of ops_cuda.h.
//
// Built only where torch has CUDA (smartgrpo_fast/ops/_cpp.py: cuda_extension), after the CPU
// library, which defines the op schemas (ops_cpu.cpp); the signatures here mirror its CPU
// implementations. x0_estimate has no CUDA C++ version (under SMARTGRPO_BACKEND=cuda it runs
// its Triton kernel), so it is not registered here. Outputs are allocated by the Python
// caller; the only allocation here is cem_update's pooled workspace, through torch's caching
// allocator. Everything runs on the current stream without synchronising; seed, round and
// row offset tensors stay on the device and are read by the kernels, so a captured CUDA graph
// sees in-place changes of them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "ops_cuda.h"

namespace {

int32_t dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return SGF_F32;
    case at::kBFloat16:
      return SGF_BF16;
    case at::kHalf:
      return SGF_F16;
    case at::kDouble:
      return SGF_F64;
    default:
      TORCH_CHECK(false, name, ": expected a float dtype, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& out, const char* name) {
  TORCH_CHECK(t.device() == out.device(), name, ": expected a tensor on ", out.device(),
              ", got ", t.device());
}

SgfParam param(const std::optional<at::Tensor>& t, double value, const at::Tensor& out,
               const char* name) {
  SgfParam p{};
  if (!t.has_value()) {
    p.mode = SGF_SCALAR;
    p.value = static_cast<float>(value);
    return p;
  }
  check_cuda(*t, out, name);
  TORCH_CHECK(t->dim() == 1 || t->dim() == 2, name, ": expected (B,) or (B, D), got ",
              t->sizes());
  p.data = t->data_ptr();
  p.dtype = dtype_code(*t, name);
  p.mode = t->dim() == 1 ? SGF_ROW : SGF_ELEM;
  p.stride_b = t->stride(0);
  p.stride_e = t->dim() == 2 ? t->stride(1) : 0;
  return p;
}

const int64_t* int64_scalar(const at::Tensor& t, const at::Tensor& out, const char* name) {
  check_cuda(t, out, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1, name,
              ": expected a 0-d int64 tensor");
  return t.data_ptr<int64_t>();
}

SgfKeyArgs key_args(const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                    const std::optional<at::Tensor>& round_t, int64_t round,
                    const std::optional<at::Tensor>& row_offset_t, int64_t row_offset,
                    const at::Tensor& out) {
  SgfKeyArgs k{};
  if (seed_t.has_value()) {
    k.seed_ptr = int64_scalar(*seed_t, out, "seed");
  } else {
    k.seed_lo = static_cast<uint32_t>(seed_lo);
    k.seed_hi = static_cast<uint32_t>(seed_hi);
  }
  if (round_t.has_value()) {
    k.round_ptr = int64_scalar(*round_t, out, "round");
  } else {
    k.round_val = static_cast<uint32_t>(round);
  }
  if (row_offset_t.has_value()) {
    k.row_offset_ptr = int64_scalar(*row_offset_t, out, "row_offset");
  } else {
    k.row_offset_val = static_cast<uint32_t>(row_offset);
  }
  return k;
}

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", sgf_cuda_error_string(err));
}

void check_out(const at::Tensor& out, const char* name) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous(), name,
              ": expected a contiguous CUDA tensor");
}

// ------------------------------------------------------------------------------------------

void philox_bits_out(at::Tensor& out, const at::Tensor& counters, int64_t k0, int64_t k1) {
  const c10::cuda::CUDAGuard guard(out.device());
  check_out(out, "out");
  check_cuda(counters, out, "counters");
  TORCH_CHECK(counters.is_contiguous() && counters.dim() == 2 && counters.size(1) == 4 &&
                  counters.scalar_type() == at::kLong && out.scalar_type() == at::kLong &&
                  out.numel() == counters.numel(),
              "counters, out: expected contiguous (N, 4) int64 tensors");
  check_launch(sgf_cuda_philox_bits(out.data_ptr<int64_t>(), counters.data_ptr<int64_t>(),
                                    counters.size(0), static_cast<uint32_t>(k0),
                                    static_cast<uint32_t>(k1), current_stream(out)),
               "philox_bits");
}

void philox_normal_out(at::Tensor& out, const std::optional<at::Tensor>& seed_t, int64_t seed_lo,
                       int64_t seed_hi, const std::optional<at::Tensor>& round_t, int64_t round,
                       const std::optional<at::Tensor>& row_offset_t, int64_t row_offset) {
  const c10::cuda::CUDAGuard guard(out.device());
  check_out(out, "out");
  TORCH_CHECK(out.dim() >= 2 && out.scalar_type() == at::kFloat, "out: expected (B, k, *S) f32");
  const int64_t batch = out.size(0), k = out.size(1);
  const int64_t d = out.numel() / (batch * k);
  check_launch(sgf_cuda_philox_normal(out.data_ptr<float>(), batch, k, d,
                                      key_args(seed_t, seed_lo, seed_hi, round_t, round,
                                               row_offset_t, row_offset, out),
                                      current_stream(out)),
               "philox_normal");
}

void sample_perturb_out(at::Tensor& out, const at::Tensor& mean,
                        const std::optional<at::Tensor>& mu, double mu_val,
                        const std::optional<at::Tensor>& sigma, double sigma_val,
                        const std::optional<at::Tensor>& scale, double scale_val,
                        const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                        const std::optional<at::Tensor>& round_t, int64_t round,
                        const std::optional<at::Tensor>& row_offset_t, int64_t row_offset) {
  const c10::cuda::CUDAGuard guard(out.device());
  check_out(out, "out");
  check_cuda(mean, out, "mean");
  TORCH_CHECK(mean.dim() == 2 && out.dim() >= 2 && out.size(0) == mean.size(0),
              "mean, out: expected (B, D) and (B, k, *S)");
  SgfSamplePerturbArgs a{};
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out, "out");
  a.mean = mean.data_ptr();
  a.mean_dtype = dtype_code(mean, "mean");
  a.mean_stride_b = mean.stride(0);
  a.mean_stride_e = mean.stride(1);
  a.mu = param(mu, mu_val, out, "mu");
  a.sigma = param(sigma, sigma_val, out, "sigma");
  a.scale = param(scale, scale_val, out, "scale");
  a.batch = mean.size(0);
  a.k = out.size(1);
  a.d = mean.size(1);
  TORCH_CHECK(out.numel() == a.batch * a.k * a.d, "out: expected B * k * D elements");
  a.key = key_args(seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset, out);
  check_launch(sgf_cuda_sample_perturb(&a, current_stream(out)), "sample_perturb");
}

void cem_update_out(at::Tensor& mu_out, at::Tensor& sigma_out, const std::optional<at::Tensor>& mu,
                    double mu_val, const std::optional<at::Tensor>& sigma, double sigma_val,
                    const at::Tensor& elite_idx, int64_t k,
                    const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                    const std::optional<at::Tensor>& round_t, int64_t round,
                    const std::optional<at::Tensor>& row_offset_t, int64_t row_offset,
                    double alpha, double min_sigma, bool per_element,
                    const std::optional<at::Tensor>& counts) {
  const c10::cuda::CUDAGuard guard(mu_out.device());
  check_out(mu_out, "mu_out");
  check_out(sigma_out, "sigma_out");
  check_cuda(elite_idx, mu_out, "elite_idx");
  TORCH_CHECK(elite_idx.dim() == 2 && (elite_idx.scalar_type() == at::kLong ||
                                       elite_idx.scalar_type() == at::kInt),
              "elite_idx: expected a (B, T) int64 or int32 tensor");
  TORCH_CHECK(mu_out.scalar_type() == at::kFloat && sigma_out.scalar_type() == at::kFloat,
              "mu_out, sigma_out: expected float32");
  SgfCemUpdateArgs a{};
  a.batch = elite_idx.size(0);
  a.t = elite_idx.size(1);
  a.k = k;
  a.d = mu_out.numel() / a.batch;
  TORCH_CHECK(sigma_out.numel() == (per_element ? a.batch * a.d : a.batch),
              "sigma_out: expected (B, *S), or (B,) when pooled");
  a.mu_out = mu_out.data_ptr<float>();
  a.sigma_out = sigma_out.data_ptr<float>();
  a.mu = param(mu, mu_val, mu_out, "mu");
  a.sigma = param(sigma, sigma_val, mu_out, "sigma");
  TORCH_CHECK(per_element || a.sigma.mode != SGF_ELEM,
              "sigma: a pooled update needs one sigma per row");
  a.elite_idx = elite_idx.data_ptr();
  a.idx_is_int32 = elite_idx.scalar_type() == at::kInt;
  a.idx_stride_b = elite_idx.stride(0);
  a.idx_stride_t = elite_idx.stride(1);
  if (counts.has_value()) {
    check_cuda(*counts, mu_out, "counts");
    TORCH_CHECK(counts->dim() == 1 && counts->size(0) == a.batch &&
                    counts->scalar_type() == at::kLong,
                "counts: expected a (B,) int64 tensor");
    a.counts = counts->data_ptr<int64_t>();
    a.counts_stride = counts->stride(0);
  }
  a.alpha = static_cast<float>(alpha);
  a.one_minus_alpha = static_cast<float>(1.0 - alpha);
  a.min_sigma = static_cast<float>(min_sigma);
  a.per_element = per_element ? 1 : 0;
  a.key = key_args(seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset, mu_out);
  at::Tensor workspace;
  if (!per_element) {
    const auto bytes = static_cast<int64_t>(sgf_cuda_cem_update_workspace(a.batch, a.d));
    workspace = at::empty({bytes}, mu_out.options().dtype(at::kByte));
  }
  check_launch(sgf_cuda_cem_update(&a, per_element ? nullptr : workspace.data_ptr(),
                                   current_stream(mu_out)),
               "cem_update");
}

}  // namespace

TORCH_LIBRARY_IMPL(smartgrpo_fast, CUDA, m) {
  m.impl("philox_bits_out", &philox_bits_out);
  m.impl("philox_normal_out", &philox_normal_out);
  m.impl("sample_perturb_out", &sample_perturb_out);
  m.impl("cem_update_out", &cem_update_out);
}
