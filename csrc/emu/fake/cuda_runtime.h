// CPU emulator stand-in for <cuda_runtime.h>: see ../emulator.h.
#pragma once
#include "../emulator.h"  // the emulator defines the CUDA types and intrinsics the kernels use
