// Host launcher of the backward kernel (backward.cuh): one launch for grad_z and grad_p.

#include <cstdlib>

#include "backward.cuh"
#include "launch.h"

namespace protokern {
namespace {

std::atomic<uint64_t> backward_ready{0};

}  // namespace

int backward_max_parts_from_env() {
  const char* env = std::getenv("PROTOKERN_CUDA_GRAD_P_PARTS");
  if (env == nullptr || *env == '\0') return 0;
  const int v = std::atoi(env);
  TORCH_CHECK(v >= 1 && v <= kGpMaxParts, "PROTOKERN_CUDA_GRAD_P_PARTS must be 1..", kGpMaxParts, ", got '", env,
              "'");
  return v;
}

BackwardWorkspace backward_workspace(const BackwardParams& prm) {
  if (prm.B == 0 || prm.M == 0) return {0, 0};
  return backward_workspace(backward_launch(prm), prm);
}

void launch_backward(const BackwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;  // the caller fills zeros
  const BackwardLaunch l = backward_launch(prm);
  TORCH_CHECK(l.gp_parts <= 1 || (prm.gp_partial != nullptr && prm.gp_count != nullptr),
              "protokern: launch_backward needs its workspace (backward_workspace)");
  allow_dynamic_smem(backward_kernel, kBwMaxSmem, backward_ready);
  backward_kernel<<<l.blocks, kBwThreads, l.smem, stream>>>(prm, l);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protokern
