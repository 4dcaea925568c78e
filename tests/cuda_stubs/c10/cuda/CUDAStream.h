// Stand-in for torch's c10/cuda/CUDAStream.h on CPU-only torch builds (whose CUDA headers do
// not compile): just enough for bind_cuda.cpp to compile, so tests/test_cpp.py can check that
// its kernels register against the op schemas. Never used for real CUDA work.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAStream {
  void* stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
