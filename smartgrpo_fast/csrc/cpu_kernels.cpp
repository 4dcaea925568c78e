// Dispatch of the CPU kernels between the baseline and the AVX2 copies of cpu_kernels.inc.
#include "cpu_kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SGF_HAVE_AVX2_COPY 1
#include <immintrin.h>
#else
#define SGF_HAVE_AVX2_COPY 0
#endif

#define SGF_INLINE inline __attribute__((always_inline))

namespace sgf::cpu {

namespace generic {
#define SGF_AVX2 0
#include "cpu_kernels.inc"
#undef SGF_AVX2
}  // namespace generic

#if SGF_HAVE_AVX2_COPY
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#define SGF_AVX2 1
#include "cpu_kernels.inc"
#undef SGF_AVX2
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

//! True when the AVX2 copy runs: the CPU (and OS) support AVX2 and SMARTGRPO_CPU_ISA != generic.
bool use_avx2() {
#if SGF_HAVE_AVX2_COPY
  const char* forced = getenv("SMARTGRPO_CPU_ISA");
  if (forced != nullptr && strcmp(forced, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

}  // namespace

int64_t n_blocks(int64_t d) { return (d + kBlock - 1) / kBlock; }

Tiling sample_perturb_tiling(int64_t batch, int64_t k, int64_t d, int threads) {
  Tiling t;
  t.n_blocks = n_blocks(d);
  const int64_t target = 4 * static_cast<int64_t>(threads > 0 ? threads : 1);
  const int64_t base = batch * t.n_blocks;
  int64_t chunks = base >= target ? 1 : (target + base - 1) / base;
  chunks = chunks < k ? chunks : k;
  t.per_chunk = (k + chunks - 1) / chunks;
  t.n_chunks = (k + t.per_chunk - 1) / t.per_chunk;
  return t;
}

void sample_perturb(const SamplePerturbArgs& a, const Tiling& tiling, int64_t begin, int64_t end) {
#if SGF_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::sample_perturb_tasks(a, tiling, begin, end);
#endif
  generic::sample_perturb_tasks(a, tiling, begin, end);
}

void cem_update(const CemUpdateArgs& a, int64_t begin, int64_t end) {
#if SGF_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::cem_update_tasks(a, begin, end);
#endif
  generic::cem_update_tasks(a, begin, end);
}

void x0_estimate(const X0EstimateArgs& a, int64_t begin, int64_t end) {
#if SGF_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::x0_estimate_tasks(a, begin, end);
#endif
  generic::x0_estimate_tasks(a, begin, end);
}

void philox_normal(const PhiloxNormalArgs& a, int64_t begin, int64_t end) {
#if SGF_HAVE_AVX2_COPY
  if (use_avx2()) return avx2::philox_normal_tasks(a, begin, end);
#endif
  generic::philox_normal_tasks(a, begin, end);
}

const char* isa() { return use_avx2() ? "avx2" : "generic"; }

}  // namespace sgf::cpu
