// Host-side helpers of the launchers (forward.cu, backward.cu).
#pragma once

#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <cstdint>

#include "params.h"

namespace protokern {
namespace {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` once per device (`done` caches it).
template <class Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  done.fetch_or(bit, std::memory_order_relaxed);
}

}  // namespace
}  // namespace protokern
