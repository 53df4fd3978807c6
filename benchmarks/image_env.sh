#!/usr/bin/env bash
# Before a GPU session, on a machine without a GPU: the project under the GPU machine's versions (Python 3.12,
# torch 2.11.0 cu130, triton 3.6.0, torchvision 0.26.0, numpy 2.5), which are not the versions this repository
# pins. A clean clone of HEAD is installed into a fresh virtual environment, the CUDA
# extension built against that torch for sm_90 and imported, and the test suite run (the Triton kernels under
# Triton 3.6's interpreter). An API or header that torch 2.11 or Triton 3.6 lacks fails here instead of in
# gpu_check.sh's build or tests on the device.
#
#   bash benchmarks/image_env.sh [VENV]      # default VENV /tmp/protokern-image-env (reused if present)
#   PYTHON=/path/to/python3.12 bash benchmarks/image_env.sh   # where python3.12 is not on PATH
#
# Downloads ~1.5 GB the first time (torch's CUDA wheel and its nvidia-* dependencies). numpy stays below 2.3
# here: Triton 3.6's interpreter fails with later numpy ("only 0-dimensional arrays can be converted to Python
# scalars"); the image has numpy 2.5 but runs Triton compiled, never interpreted. Needs nvcc 13 at CUDA_HOME
# (default /usr/local/cuda). Exits non-zero if the build, the import or any test fails.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/protokern-image-env}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$venv/bin/python" ] || "${PYTHON:-python3.12}" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.3" pytest pytest-benchmark \
  tqdm pillow scipy pyyaml setuptools wheel
"$venv/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

src=$(mktemp -d /tmp/protokern-image-src.XXXXXX)
git clone -q "$repo" "$src"
cd "$src"
git log -1 --format='commit %h %s'
"$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import protokern._C, torch; torch.ops.protokern_C.forward; print('protokern._C built for sm_90 against torch', torch.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider
