// Host launcher of the backward kernels (backward.cuh).

#include "backward.cuh"
#include "launch.h"

namespace protokern {
namespace {

std::atomic<uint64_t> grad_z_ready{0};

}  // namespace

void launch_backward(const BackwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;  // the caller fills zeros
  const Launch lp = grad_p_launch(prm);
  grad_p_kernel<<<dim3(lp.grid_x, lp.grid_y), lp.threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const GradZLaunch lz = grad_z_launch(prm);
  allow_dynamic_smem(grad_z_kernel, kGzMaxSmem, grad_z_ready);
  grad_z_kernel<<<dim3(lz.grid_x, lz.grid_y), lz.threads, lz.smem, stream>>>(prm, lz.KT, lz.seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protokern
