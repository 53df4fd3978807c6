// Kernel parameters (FlashAttention-style: one plain struct per launch) and the host launchers: the
// interface between the op registration (protokern.cpp, host compiler, heavy torch headers) and the
// CUDA code (nvcc, light headers only). Layout of csrc/:
//   params.h      this file
//   common.cuh    device helpers shared by the kernels (cp.async, TF32 MMA, tie-break order, tiling)
//   forward.cuh   forward kernel: certified patch search + exact rescoring (FFMA / 3xTF32 / TF32)
//   backward.cuh  the backward kernel (grad_z and grad_p blocks in one launch)
//   forward.cu, backward.cu   host launchers (one translation unit each: they compile in parallel)
//   emu/          CPU emulator that includes the same .cuh headers (python csrc/emu/check.py)
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace protokern {

// Search precision of the forward: "highest" = fp32 FFMA products, "high" = 3xTF32 tensor-core
// products, "medium" = TF32 ones. It changes speed only: every patch the search cannot rule out is
// rescored exactly in fp32, so the outputs are identical for all three (forward.cuh).
enum : int { kSearchFp32 = 0, kSearch3xTf32 = 1, kSearchTf32 = 2 };

// Forward: z is (B, D, HW) float32 with arbitrary element strides; p is (M, D) contiguous float32. Outputs are
// (B, M) contiguous. zr: the same z as rows of channels (unit channel stride), 16-byte aligned, with image and
// patch strides zr_sb, zr_sk multiples of 4 (z itself where it lies so, else a copy), from which the exact
// rescoring reads each candidate's channels: required where forward_needs_rows says so (every launch but the
// dense 7x7 path's, which rescores from shared memory), else ignored.
struct ForwardParams {
  const float* z;
  int64_t z_sb, z_sd, z_sk;  // element strides of z over (B, D, HW)
  const float* zr;
  int64_t zr_sb, zr_sk;  // element strides of zr over (B, HW); its channel stride is 1
  const float* p;
  float* similarity;
  float* min_distances;
  int64_t* patch_index;
  int B, D, HW, M;
  float eps;
  int precision;  // kSearch*
};

// Backward: z is (B, D, HW) float32 with arbitrary element strides (staged as they are); all (B, M) tensors
// and p are contiguous; grad_z is written (B, D, HW) contiguous. Above kBackwardStagedPatches patches grad_p
// gathers each winner's 32-channel run of z from global memory, one 32-byte sector per element unless the
// channels are innermost: protokern.cpp then passes a channels-innermost copy of z (one read and write of z
// against 8x the gathered bytes).
constexpr int kBackwardStagedPatches = 256;
struct BackwardParams {
  const float* grad_similarity;
  const float* grad_min_distances;
  const float* z;
  int64_t z_sb, z_sd, z_sk;  // element strides of z over (B, D, HW)
  const float* p;
  const int64_t* patch_index;
  const float* min_distances;
  float* grad_z;
  float* grad_p;
  // grad_p's image parts (backward_workspace): gp_partial holds partial_floats floats (any contents), gp_count
  // holds counters unsigned ints, all zero at launch; both unused (may be null) where those sizes are 0.
  float* gp_partial;
  unsigned* gp_count;
  int B, D, HW, M;
  float eps;
  int gp_max_parts;  // grad_p's image parts at most; 0: the launcher's default (backward_max_parts_from_env)
};

// grad_p's image parts at most as the environment asks: PROTOKERN_CUDA_GRAD_P_PARTS (1 to 4; a benchmark's A/B
// switch: benchmarks/distance.py times the CUB shape's backward with grad_p in one part too), else 0 (the default).
int backward_max_parts_from_env();

// The backward's workspace for params' sizes (B, D, HW, M) and gp_max_parts.
struct BackwardWorkspace {
  int64_t partial_floats;
  int64_t counters;
};
BackwardWorkspace backward_workspace(const BackwardParams& params);

// Both launch on `stream` and check the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
bool forward_needs_rows(const ForwardParams& params);  // whether launch_forward reads params.zr (current device)
void launch_forward(const ForwardParams& params, cudaStream_t stream);
void launch_backward(const BackwardParams& params, cudaStream_t stream);

}  // namespace protokern
