// CPU emulator stand-in for <cuda_runtime.h>: see ../emulator.h.
#pragma once
#include "../emulator.h"
