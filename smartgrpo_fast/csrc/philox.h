// The one noise stream of smartgrpo_fast, for C++ and CUDA: Philox4x32-10 + Box-Muller.
//
// The contract is the docstring of smartgrpo_fast/ops/philox.py; this header implements its
// integer part, shared by the CPU ops (cpu_kernels.inc) and the CUDA kernels (ops_cuda.cu):
//
//   key     (k0, k1)         = (seed mod 2^32, seed >> 32)
//   counter (c0, c1, c2, c3) = (e / 4, j, b + row_offset, round)
//                                e: flat element, j: candidate, b: row of the call
//   (x0, x1, x2, x3)         = Philox4x32-10(counter, key)  (Random123 constants, ten rounds)
//   u                        = ((x >> 8) + 0.5) * 2^-24     exact in float32, in (0, 1)
//   Box-Muller on (u0, u1) -> n[4g], n[4g+1] and on (u2, u3) -> n[4g+2], n[4g+3]:
//     r = sqrt(-2 ln u_first), theta = u_second * 6.2831854820251465f, (r cos theta, r sin theta)
//
// Torch-free on purpose: the CUDA file that includes it must compile with plain nvcc.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SGF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SGF_HOST_DEVICE inline
#endif

namespace sgf {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
//! 2 pi rounded to float32: the exact constant every backend multiplies by.
constexpr float kTwoPiF32 = 6.2831854820251465f;
//! 2^-24, the uniform step.
constexpr float kUniformStep = 5.9604644775390625e-08f;

//! The key words and the round word of one (seed, round), and the row offset of a call.
struct StreamKey {
  uint32_t k0;
  uint32_t k1;
  uint32_t round;
  uint32_t row_offset;  // row b of the call is the stream's row b + row_offset
};

//! Four 32-bit Philox output words.
struct Words4 {
  uint32_t x0, x1, x2, x3;
};

SGF_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

//! Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1); bit-identical to Random123.
SGF_HOST_DEVICE Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = mulhi32(c0, kPhiloxM0);
    const uint32_t lo0 = c0 * kPhiloxM0;
    const uint32_t hi1 = mulhi32(c2, kPhiloxM1);
    const uint32_t lo1 = c2 * kPhiloxM1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Words4{c0, c1, c2, c3};
}

//! The row word of row b of a call: b + row_offset (validated by the caller to stay < 2^32).
SGF_HOST_DEVICE uint32_t row_word(const StreamKey& key, int64_t b) {
  return static_cast<uint32_t>(b) + key.row_offset;
}

//! The uniform in (0, 1) of one word: ((x >> 8) + 0.5) * 2^-24, exact in float32.
SGF_HOST_DEVICE float uniform01(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * kUniformStep;
}

}  // namespace sgf
