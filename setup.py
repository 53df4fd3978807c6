"""Build script for protokern.

Install with the already-installed torch (the CUDA extension must be compiled against it):

    pip install --no-build-isolation .          # or: pip install --no-build-isolation -e .

The CUDA extension ``protokern._C`` (csrc/) is built when a CUDA toolkit is found and torch is a
CUDA build; otherwise protokern installs as pure Python (its Triton and torch backends still work).

Environment:
    PROTOKERN_NO_CUDA=1      skip the extension
    CUDA_HOME=/usr/local/cuda where the toolkit lives (default: CUDA_HOME/CUDA_PATH, else
                             /usr/local/cuda, else torch's own search from `nvcc` on PATH)
    TORCH_CUDA_ARCH_LIST     e.g. "9.0" or "8.0;9.0" (default: the visible GPU, else "9.0")
    MAX_JOBS                 parallel compile jobs (the three sources build in parallel)
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _find_cuda_home() -> None:
    """Point torch at a real toolkit before it guesses from `nvcc` on PATH (which may be a shim)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = str(default)


def _extension_setup() -> dict:
    """setup() arguments for the CUDA extension, or {} (pure Python) with the reason printed."""
    if os.environ.get("PROTOKERN_NO_CUDA", "") not in ("", "0"):
        print("protokern: PROTOKERN_NO_CUDA set, skipping the CUDA extension")
        return {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # no torch at build time: use --no-build-isolation
        print(f"protokern: torch not importable ({exc}), skipping the CUDA extension")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("protokern: no CUDA toolkit or CPU-only torch, skipping the CUDA extension")
        return {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    print(
        f"protokern: building protokern._C with CUDA_HOME={CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    ext = CUDAExtension(
        name="protokern._C",
        sources=["csrc/protokern.cpp", "csrc/forward.cu", "csrc/backward.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="protokern",
    version="0.1.0",
    description="Fast ProtoPNet prototype layers: fused prototype distances with Triton and CUDA",
    python_requires=">=3.10",
    # `kernels/` (Triton kernels) lives at the repository root and installs as protokern.kernels;
    # the default editable mode maps it too (setuptools' editable finder honours package_dir).
    packages=find_packages(include=["protokern", "protokern.*"])
    + ["protokern.kernels"]
    + ["protokern.kernels." + name for name in find_packages(where="kernels")],
    package_dir={"protokern.kernels": "kernels"},
    # Triton only where torch itself requires it (its Linux x86_64 wheels): elsewhere the torch backend runs alone
    install_requires=["torch", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'", "numpy", "tqdm",
                      "pillow", "scipy", "torchvision", "pyyaml"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist"]},
    zip_safe=False,
    **_extension_setup(),
)
