// C entry points of the CPU emulator (see emulator.h); kernels_emu.inc is kernels.cu up to its host
// launchers, with `extern __shared__` declarations turned into pointers (made by check.py).
#include "emulator.h"

#include "kernels_emu.inc"

}  // namespace protokern

using namespace protokern;

extern "C" void emu_forward(const ForwardParams* prm) {
  if (prm->B == 0 || prm->M == 0) return;
  const Launch l = forward_launch(*prm);
  const ForwardParams p = *prm;
  with_forward_kernel(p, /*tensor_cores=*/true, [&](auto kernel, size_t smem, int) {
    emu::launch({l.grid_x, l.grid_y}, l.threads, smem, [&] { kernel(p); });
  });
}

extern "C" void emu_backward(const BackwardParams* prm) {
  if (prm->B == 0 || prm->M == 0) return;
  const BackwardParams p = *prm;
  const Launch lp = grad_p_launch(p);
  emu::launch({lp.grid_x, lp.grid_y}, lp.threads, lp.smem, [&] { grad_p_kernel(p); });
  const GradZLaunch lz = grad_z_launch(p);
  emu::launch({lz.grid_x, lz.grid_y}, lz.threads, lz.smem, [&] { grad_z_kernel(p, lz.KT, lz.seg); });
}
