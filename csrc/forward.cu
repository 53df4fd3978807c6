// Host launcher of the forward kernel (forward.cuh).

#include <utility>

#include "forward.cuh"
#include "launch.h"

namespace protokern {
namespace {

std::atomic<uint64_t> forward_ready[kForwardVariants];

// Can the tensor-core searches run on the current device? Decided by what was compiled, not by the
// device's capability: the MMA kernel image loaded for this device must come from PTX of compute_80
// or later (a build for sm_75 or a compute_75 PTX JIT-compiled on an sm_90 has mma_tf32 trapping).
// Without them every precision runs the FFMA search, which gives the same outputs (forward.cuh).
// Cached per device.
bool mma_search_compiled(int device) {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes
  if (device < 64 && cache[device].load(std::memory_order_relaxed) != 0)
    return cache[device].load(std::memory_order_relaxed) == 2;
  cudaFuncAttributes a1{}, a2{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a1, forward_kernel<kZCols4, MmaSearch<true>, false>));
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a2, forward_kernel<kZCols4, MmaSearch<false>, false>));
  const bool ok = a1.ptxVersion >= 80 && a2.ptxVersion >= 80;
  if (device < 64) cache[device].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

// Streaming multiprocessors of `device`, cached.
int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 64 && cache[device].load(std::memory_order_relaxed) != 0)
    return cache[device].load(std::memory_order_relaxed);
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// The launch shape and search of prm on the current device.
std::pair<ForwardLaunch, int> forward_choice(const ForwardParams& prm) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const ForwardLaunch l = forward_launch(prm, 2 * sm_count(device));  // 2 resident blocks per SM
  return {l, mma_search_compiled(device) ? prm.precision : kSearchFp32};
}

}  // namespace

bool forward_needs_rows(const ForwardParams& prm) {
  if (prm.B == 0 || prm.M == 0) return false;
  const auto [l, search] = forward_choice(prm);
  return !forward_ring(prm, l, search);
}

void launch_forward(const ForwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;
  const auto [l, search] = forward_choice(prm);
  TORCH_CHECK(forward_ring(prm, l, search) || forward_rows_ok(prm),
              "protokern forward: the rescoring's z rows (ForwardParams::zr) are missing or not 16-byte aligned");
  with_forward_kernel(prm, search, l.resident, [&](auto kernel, size_t smem, int variant) {
    allow_dynamic_smem(kernel, smem, forward_ready[variant]);
    kernel<<<dim3(l.grid_x, l.grid_y), l.threads, smem, stream>>>(prm, l.ipb);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protokern
