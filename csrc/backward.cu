// Host launcher of the backward kernel (backward.cuh): one launch for grad_z and grad_p.

#include "backward.cuh"
#include "launch.h"

namespace protokern {
namespace {

std::atomic<uint64_t> backward_ready{0};

}  // namespace

void launch_backward(const BackwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;  // the caller fills zeros
  const BackwardLaunch l = backward_launch(prm);
  allow_dynamic_smem(backward_kernel, kBwMaxSmem, backward_ready);
  backward_kernel<<<l.blocks, kBwThreads, l.smem, stream>>>(prm, l);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protokern
