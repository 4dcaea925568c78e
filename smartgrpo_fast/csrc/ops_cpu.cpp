// The smartgrpo_fast torch operators: their schemas (TORCH_LIBRARY) and CPU implementations.
//
// Every op writes into output tensors allocated by the Python caller (smartgrpo_fast/ops/*.py
// allocates through ``alloc`` and validates every argument before calling here). The work is
// split into tasks by cpu_kernels.h and spread over threads with at::parallel_for (OpenMP in
// the torch builds we target), so torch.set_num_threads applies.
//
// Parameters (mu, sigma, scale, t) follow smartgrpo_fast.ops._common.Param: ``None`` + value
// (one float for all), a (rows,) tensor (one value per row, any stride, any float dtype), or a
// (rows, D) tensor (one per element, any strides). Seeds, rounds and row offsets are ints, or
// 0-d int64 tensors whose value is read here (on CUDA the kernels read them; see bind_cuda.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace {

using sgf::StreamKey;
namespace cpu = sgf::cpu;

cpu::DType storage_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cpu::DType::kFloat32;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    case at::kHalf:
      return cpu::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

void check_out(const at::Tensor& t, const char* name, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous output tensor");
  TORCH_CHECK(t.numel() == numel, name, ": expected ", numel, " elements, got ", t.numel());
}

//! A (rows, D) tensor as cpu::Strided; ``keep`` holds a float32 copy of a float64 tensor. A
//! (rows, *S) tensor with prod(S) = D is viewed as (rows, D) here (a copy only when its strides
//! allow no view), so that the Python caller need not make the view.
cpu::Strided strided(const at::Tensor& t, const char* name, int64_t rows, int64_t d,
                     at::Tensor& keep) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() >= 2 && t.size(0) == rows && t.numel() == rows * d, name,
              ": expected shape (", rows, ", ", d, ") or (", rows, ", *S) with prod(S) = ", d,
              ", got ", t.sizes());
  keep = t;
  int64_t stride_e = t.stride(t.dim() - 1);
  if (t.dim() > 2) {
    // (rows, *S) as (rows, D) without a new tensor when the trailing dims are one strided run
    // (dims of size 1 have no say); otherwise the reshape (a copy if need be)
    int64_t span = 1;
    bool run = true;
    for (int64_t i = t.dim() - 1; i >= 1 && run; --i) {
      if (t.size(i) == 1) continue;
      run = t.stride(i) == stride_e * span;
      span *= t.size(i);
    }
    if (!run) {
      keep = t.reshape({rows, d});
      stride_e = keep.stride(1);
    }
  }
  if (keep.scalar_type() == at::kDouble) {
    keep = keep.reshape({rows, d}).to(at::kFloat);
    stride_e = keep.stride(1);
  }
  cpu::Strided s;
  s.data = keep.data_ptr();
  s.dtype = storage_dtype(keep, name);
  s.stride_b = keep.stride(0);
  s.stride_e = stride_e;
  return s;
}

//! One float32 per row: ``value`` everywhere, or the (rows,) tensor rounded to float32.
std::vector<float> row_values(const std::optional<at::Tensor>& t, double value, int64_t rows,
                              const char* name) {
  if (!t.has_value()) return std::vector<float>(rows, static_cast<float>(value));
  check_cpu(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, name, ": expected shape (", rows,
              ",), got ", t->sizes());
  const at::Tensor f = t->to(at::kFloat).contiguous();
  const float* p = f.data_ptr<float>();
  return std::vector<float>(p, p + rows);
}

//! A Param: per row (None or a (rows,) tensor) or per element (a (rows, D) or (rows, *S)
//! tensor).
struct ParamHolder {
  std::vector<float> rows;
  at::Tensor keep;
  cpu::Param param;
};

void make_param(ParamHolder& h, const std::optional<at::Tensor>& t, double value, int64_t rows,
                int64_t d, const char* name) {
  if (t.has_value() && t->dim() >= 2) {
    h.param.elem = strided(*t, name, rows, d, h.keep);
    return;
  }
  h.rows = row_values(t, value, rows, name);
  h.param.row = h.rows.data();
}

StreamKey stream_key(const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                     const std::optional<at::Tensor>& round_t, int64_t round,
                     const std::optional<at::Tensor>& row_offset_t, int64_t row_offset) {
  StreamKey key{};
  if (seed_t.has_value()) {
    const uint64_t s = static_cast<uint64_t>(seed_t->item<int64_t>());
    key.k0 = static_cast<uint32_t>(s);
    key.k1 = static_cast<uint32_t>(s >> 32);
  } else {
    key.k0 = static_cast<uint32_t>(seed_lo);
    key.k1 = static_cast<uint32_t>(seed_hi);
  }
  const int64_t r = round_t.has_value() ? round_t->item<int64_t>() : round;
  key.round = static_cast<uint32_t>(r);
  const int64_t o = row_offset_t.has_value() ? row_offset_t->item<int64_t>() : row_offset;
  key.row_offset = static_cast<uint32_t>(o);
  return key;
}

//! Work (normals drawn, or elements moved) below which a call stays on one thread: waking
//! the OpenMP team costs more than it saves (torch uses 32768 elements for elementwise ops).
constexpr int64_t kParallelNormals = 16384;
constexpr int64_t kParallelElements = 65536;

//! Run ``body`` over tasks [0, n_tasks) with at::parallel_for (OpenMP, torch's thread count),
//! each thread getting at least ``min_work / work_per_task`` tasks.
template <typename F>
void run_tasks(int64_t n_tasks, int64_t work_per_task, int64_t min_work, const F& body) {
  const int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_task));
  at::parallel_for(0, n_tasks, grain, [&](int64_t begin, int64_t end) { body(begin, end); });
}

// ------------------------------------------------------------------------------------------

void philox_bits_out(at::Tensor& out, const at::Tensor& counters, int64_t k0, int64_t k1) {
  check_cpu(counters, "counters");
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "counters: expected an (N, 4) int64 tensor");
  check_out(out, "out", counters.numel());
  TORCH_CHECK(out.scalar_type() == at::kLong, "out: expected int64");
  const at::Tensor c = counters.contiguous();
  const int64_t* pc = c.data_ptr<int64_t>();
  int64_t* po = out.data_ptr<int64_t>();
  const auto w0 = static_cast<uint32_t>(k0), w1 = static_cast<uint32_t>(k1);
  run_tasks((c.size(0) + 4095) / 4096, 4096, 4096, [&](int64_t begin, int64_t end) {
    const int64_t last = std::min(end * 4096, c.size(0));
    for (int64_t i = begin * 4096; i < last; ++i) {
      const sgf::Words4 w = sgf::philox4x32_10(
          static_cast<uint32_t>(pc[4 * i]), static_cast<uint32_t>(pc[4 * i + 1]),
          static_cast<uint32_t>(pc[4 * i + 2]), static_cast<uint32_t>(pc[4 * i + 3]), w0, w1);
      po[4 * i] = w.x0;
      po[4 * i + 1] = w.x1;
      po[4 * i + 2] = w.x2;
      po[4 * i + 3] = w.x3;
    }
  });
}

void philox_normal_out(at::Tensor& out, const std::optional<at::Tensor>& seed_t, int64_t seed_lo,
                       int64_t seed_hi, const std::optional<at::Tensor>& round_t, int64_t round,
                       const std::optional<at::Tensor>& row_offset_t, int64_t row_offset) {
  TORCH_CHECK(out.dim() >= 2, "out: expected (B, k, *S)");
  check_out(out, "out", out.numel());
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out: expected float32");
  cpu::PhiloxNormalArgs a;
  a.out = out.data_ptr<float>();
  a.batch = out.size(0);
  a.k = out.size(1);
  a.d = out.numel() / (a.batch * a.k);
  a.key = stream_key(seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset);
  run_tasks(a.batch * a.k * cpu::n_blocks(a.d), std::min(a.d, cpu::kBlock), kParallelNormals,
            [&](int64_t begin, int64_t end) { cpu::philox_normal(a, begin, end); });
}

void sample_perturb_out(at::Tensor& out, const at::Tensor& mean,
                        const std::optional<at::Tensor>& mu, double mu_val,
                        const std::optional<at::Tensor>& sigma, double sigma_val,
                        const std::optional<at::Tensor>& scale, double scale_val,
                        const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                        const std::optional<at::Tensor>& round_t, int64_t round,
                        const std::optional<at::Tensor>& row_offset_t, int64_t row_offset) {
  TORCH_CHECK(mean.dim() >= 2 && mean.size(0) > 0, "mean: expected a (B, D) or (B, *S) tensor");
  const int64_t batch = mean.size(0), d = mean.numel() / batch;
  TORCH_CHECK(out.dim() >= 2 && out.size(0) == batch, "out: expected (B, k, *S)");
  const int64_t k = out.size(1);
  check_out(out, "out", batch * k * d);
  at::Tensor mean_keep;
  ParamHolder p_mu, p_sigma;
  cpu::SamplePerturbArgs a;
  a.out = out.data_ptr();
  a.out_dtype = storage_dtype(out, "out");
  a.mean = strided(mean, "mean", batch, d, mean_keep);
  make_param(p_mu, mu, mu_val, batch, d, "mu");
  make_param(p_sigma, sigma, sigma_val, batch, d, "sigma");
  const std::vector<float> scale_rows = row_values(scale, scale_val, batch, "scale");
  a.mu = p_mu.param;
  a.sigma = p_sigma.param;
  a.scale = scale_rows.data();
  a.batch = batch;
  a.k = k;
  a.d = d;
  a.key = stream_key(seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset);
  const cpu::Tiling tiling = cpu::sample_perturb_tiling(batch, k, d, at::get_num_threads());
  const int64_t normals_per_task = tiling.per_chunk * std::min(d, cpu::kBlock);
  run_tasks(batch * tiling.n_blocks * tiling.n_chunks, normals_per_task, kParallelNormals,
            [&](int64_t begin, int64_t end) { cpu::sample_perturb(a, tiling, begin, end); });
}

void x0_estimate_out(at::Tensor& out, const at::Tensor& z, const at::Tensor& v,
                     const std::optional<at::Tensor>& t, double t_val, double scaling,
                     double shift) {
  TORCH_CHECK(z.dim() >= 2 && z.size(0) > 0, "z: expected an (N, D) or (N, *S) tensor");
  const int64_t rows = z.size(0), d = z.numel() / rows;
  check_out(out, "out", rows * d);
  at::Tensor z_keep, v_keep;
  cpu::X0EstimateArgs a;
  a.out = out.data_ptr();
  a.out_dtype = storage_dtype(out, "out");
  a.z = strided(z, "z", rows, d, z_keep);
  a.v = strided(v, "v", rows, d, v_keep);
  const std::vector<float> t_rows = row_values(t, t_val, rows, "t");
  a.t = t_rows.data();
  a.scaling = static_cast<float>(scaling);
  a.shift = static_cast<float>(shift);
  a.rows = rows;
  a.d = d;
  run_tasks(rows * cpu::n_blocks(d), std::min(d, cpu::kBlock), kParallelElements,
            [&](int64_t begin, int64_t end) { cpu::x0_estimate(a, begin, end); });
}

void cem_update_out(at::Tensor& mu_out, at::Tensor& sigma_out, const std::optional<at::Tensor>& mu,
                    double mu_val, const std::optional<at::Tensor>& sigma, double sigma_val,
                    const at::Tensor& elite_idx, int64_t k,
                    const std::optional<at::Tensor>& seed_t, int64_t seed_lo, int64_t seed_hi,
                    const std::optional<at::Tensor>& round_t, int64_t round,
                    const std::optional<at::Tensor>& row_offset_t, int64_t row_offset,
                    double alpha, double min_sigma, bool per_element,
                    const std::optional<at::Tensor>& counts) {
  check_cpu(elite_idx, "elite_idx");
  TORCH_CHECK(elite_idx.dim() == 2, "elite_idx: expected (B, T)");
  const int64_t batch = elite_idx.size(0), t = elite_idx.size(1);
  TORCH_CHECK(mu_out.dim() >= 1 && mu_out.size(0) == batch, "mu_out: expected (B, *S)");
  TORCH_CHECK(mu_out.scalar_type() == at::kFloat && sigma_out.scalar_type() == at::kFloat,
              "mu_out, sigma_out: expected float32");
  const int64_t d = mu_out.numel() / batch;
  check_out(mu_out, "mu_out", batch * d);
  check_out(sigma_out, "sigma_out", per_element ? batch * d : batch);
  const at::Tensor idx = elite_idx.to(at::kLong).contiguous();
  at::Tensor counts_c;
  if (counts.has_value()) {
    check_cpu(*counts, "counts");
    TORCH_CHECK(counts->dim() == 1 && counts->size(0) == batch &&
                    counts->scalar_type() == at::kLong,
                "counts: expected a (B,) int64 tensor");
    counts_c = counts->contiguous();
  }
  ParamHolder p_mu, p_sigma;
  cpu::CemUpdateArgs a;
  make_param(p_mu, mu, mu_val, batch, d, "mu");
  make_param(p_sigma, sigma, sigma_val, batch, d, "sigma");
  a.mu = p_mu.param;
  a.sigma = p_sigma.param;
  a.mu_out = mu_out.data_ptr<float>();
  a.elite_idx = idx.data_ptr<int64_t>();
  a.counts = counts_c.defined() ? counts_c.data_ptr<int64_t>() : nullptr;
  a.batch = batch;
  a.k = k;
  a.t = t;
  a.d = d;
  a.alpha = static_cast<float>(alpha);
  a.one_minus_alpha = static_cast<float>(1.0 - alpha);
  a.min_sigma = static_cast<float>(min_sigma);
  a.per_element = per_element;
  a.key = stream_key(seed_t, seed_lo, seed_hi, round_t, round, row_offset_t, row_offset);
  const int64_t nb = cpu::n_blocks(d);
  std::vector<double> var_part;
  if (per_element) {
    a.sigma_out = sigma_out.data_ptr<float>();
  } else {
    TORCH_CHECK(a.sigma.elem.data == nullptr, "sigma: pooled update needs one sigma per row");
    var_part.assign(batch * nb, 0.0);
    a.var_part = var_part.data();
  }
  run_tasks(batch * nb, t * std::min(d, cpu::kBlock), kParallelNormals,
            [&](int64_t begin, int64_t end) { cpu::cem_update(a, begin, end); });
  if (per_element) return;
  // Pooled: sigma_b = max(min_sigma, (1 - alpha) sigma_b + alpha sqrt(mean_e var_e)); a row
  // with no elite keeps sigma_b.
  float* so = sigma_out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    if (a.counts != nullptr && a.counts[b] == 0) {
      so[b] = a.sigma.row[b];
      continue;
    }
    double sum = 0.0;
    for (int64_t blk = 0; blk < nb; ++blk) sum += var_part[b * nb + blk];
    const float var = static_cast<float>(sum / static_cast<double>(d));
    const float s = a.one_minus_alpha * a.sigma.row[b] + a.alpha * std::sqrt(var);
    so[b] = s < a.min_sigma ? a.min_sigma : s;  // NaN (a bad elite row) stays NaN
  }
}

// The packed overloads: the same ops with their scalars in two lists, for the Python fast path
// (smartgrpo_fast/ops/_fast.py): each argument costs the dispatcher's Python-to-C++ conversion
// about 0.2 us, so 8 arguments instead of 19 save about 2 us a call. Int seeds, rounds and row
// offsets only (a tensor one takes the plain overload).

//! floats: mu_val, sigma_val, scale_val; ints: seed_lo, seed_hi, round, row_offset.
void sample_perturb_out_packed(at::Tensor& out, const at::Tensor& mean,
                               const std::optional<at::Tensor>& mu,
                               const std::optional<at::Tensor>& sigma,
                               const std::optional<at::Tensor>& scale,
                               c10::ArrayRef<double> floats, c10::IntArrayRef ints) {
  TORCH_CHECK(floats.size() == 3 && ints.size() == 4,
              "sample_perturb_out.packed: expected 3 floats and 4 ints");
  sample_perturb_out(out, mean, mu, floats[0], sigma, floats[1], scale, floats[2], std::nullopt,
                     ints[0], ints[1], std::nullopt, ints[2], std::nullopt, ints[3]);
}

//! floats: mu_val, sigma_val, alpha, min_sigma; ints: k, seed_lo, seed_hi, round, row_offset,
//! per_element.
void cem_update_out_packed(at::Tensor& mu_out, at::Tensor& sigma_out,
                           const std::optional<at::Tensor>& mu,
                           const std::optional<at::Tensor>& sigma, const at::Tensor& elite_idx,
                           const std::optional<at::Tensor>& counts, c10::ArrayRef<double> floats,
                           c10::IntArrayRef ints) {
  TORCH_CHECK(floats.size() == 4 && ints.size() == 6,
              "cem_update_out.packed: expected 4 floats and 6 ints");
  cem_update_out(mu_out, sigma_out, mu, floats[0], sigma, floats[1], elite_idx, ints[0],
                 std::nullopt, ints[1], ints[2], std::nullopt, ints[3], std::nullopt, ints[4],
                 floats[2], floats[3], ints[5] != 0, counts);
}

//! Row b's key for candidate i: unique, and ordered as topk_select ranks (see
//! smartgrpo_fast/ops/topk_select.py): the float's bits made monotonic as unsigned (-0.0 as
//! +0.0, every NaN below -inf) in the high word, 2^32 - 1 - i in the low word.
inline uint64_t rank_key(float x, int64_t i) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (bits == 0x80000000u) bits = 0;  // -0.0 ranks as +0.0
  uint32_t hi = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (std::isnan(x)) hi = 0;
  return (static_cast<uint64_t>(hi) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}

template <typename scalar_t>
void topk_rows(int64_t* out, const scalar_t* r, int64_t stride_b, int64_t stride_k, int64_t k,
               int64_t t, int64_t begin, int64_t end) {
  std::vector<uint64_t> keys(static_cast<size_t>(k));
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* row = r + b * stride_b;
    for (int64_t i = 0; i < k; ++i) keys[i] = rank_key(static_cast<float>(row[i * stride_k]), i);
    std::partial_sort(keys.begin(), keys.begin() + t, keys.end(), std::greater<uint64_t>());
    for (int64_t j = 0; j < t; ++j) out[b * t + j] = 0xFFFFFFFFu - (keys[j] & 0xFFFFFFFFu);
  }
}

//! topk_select on CPU: out (B, T) int64, contiguous, the indices of the T best of each row of
//! rewards (B, K) float32/bfloat16/float16 (any strides), ranked in float32 as the Triton
//! kernel ranks them (float64 rewards stay with the reference, which ranks them in float64).
void topk_select_out(at::Tensor& out, const at::Tensor& rewards, int64_t t) {
  check_cpu(rewards, "rewards");
  TORCH_CHECK(rewards.dim() == 2, "rewards: expected a (B, K) tensor, got ", rewards.sizes());
  const int64_t batch = rewards.size(0), k = rewards.size(1);
  TORCH_CHECK(1 <= t && t <= k && k <= (int64_t{1} << 32), "t: expected 1 <= t <= K = ", k);
  check_out(out, "out", batch * t);
  TORCH_CHECK(out.scalar_type() == at::kLong, "out: expected int64");
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t sb = rewards.stride(0), sk = rewards.stride(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / k);  // rows a thread takes at least
  auto run = [&](const auto* r) {
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      topk_rows(o, r, sb, sk, k, t, b0, b1);
    });
  };
  switch (rewards.scalar_type()) {
    case at::kFloat:
      return run(rewards.const_data_ptr<float>());
    case at::kBFloat16:
      return run(rewards.const_data_ptr<at::BFloat16>());
    case at::kHalf:
      return run(rewards.const_data_ptr<at::Half>());
    default:  // float64 rewards are ranked in float64 by the reference
      TORCH_CHECK(false, "rewards: expected float32, bfloat16 or float16, got ",
                  rewards.scalar_type());
  }
}

std::string cpu_isa() { return cpu::isa(); }

}  // namespace

TORCH_LIBRARY(smartgrpo_fast, m) {
  m.def("philox_bits_out(Tensor(a!) out, Tensor counters, int k0, int k1) -> ()");
  m.def(
      "philox_normal_out(Tensor(a!) out, Tensor? seed_t, int seed_lo, int seed_hi, "
      "Tensor? round_t, int round, Tensor? row_offset_t, int row_offset) -> ()");
  m.def(
      "sample_perturb_out(Tensor(a!) out, Tensor mean, Tensor? mu, float mu_val, Tensor? sigma, "
      "float sigma_val, Tensor? scale, float scale_val, Tensor? seed_t, int seed_lo, "
      "int seed_hi, Tensor? round_t, int round, Tensor? row_offset_t, int row_offset) -> ()");
  m.def(
      "x0_estimate_out(Tensor(a!) out, Tensor z, Tensor v, Tensor? t, float t_val, "
      "float scaling, float shift) -> ()");
  m.def(
      "cem_update_out(Tensor(a!) mu_out, Tensor(b!) sigma_out, Tensor? mu, float mu_val, "
      "Tensor? sigma, float sigma_val, Tensor elite_idx, int k, Tensor? seed_t, int seed_lo, "
      "int seed_hi, Tensor? round_t, int round, Tensor? row_offset_t, int row_offset, "
      "float alpha, float min_sigma, bool per_element, Tensor? counts) -> ()");
  m.def(
      "sample_perturb_out.packed(Tensor(a!) out, Tensor mean, Tensor? mu, Tensor? sigma, "
      "Tensor? scale, float[] floats, int[] ints) -> ()");
  m.def(
      "cem_update_out.packed(Tensor(a!) mu_out, Tensor(b!) sigma_out, Tensor? mu, "
      "Tensor? sigma, Tensor elite_idx, Tensor? counts, float[] floats, int[] ints) -> ()");
  m.def("topk_select_out(Tensor(a!) out, Tensor rewards, int t) -> ()");
  m.def("cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(smartgrpo_fast, CPU, m) {
  m.impl("philox_bits_out", &philox_bits_out);
  m.impl("philox_normal_out", &philox_normal_out);
  m.impl("sample_perturb_out", &sample_perturb_out);
  m.impl("x0_estimate_out", &x0_estimate_out);
  m.impl("cem_update_out", &cem_update_out);
  m.impl("sample_perturb_out.packed", &sample_perturb_out_packed);
  m.impl("cem_update_out.packed", &cem_update_out_packed);
  m.impl("topk_select_out", &topk_select_out);
}
