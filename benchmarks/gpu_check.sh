#!/usr/bin/env bash
# The one prepared GPU check: build the CUDA extension, run the GPU tests and the benchmarks.
# Run from the repository root on a machine with a CUDA GPU. Every step writes NAME.log (and the benchmarks their
# JSON / Markdown tables) into $OUT/all; at the end that folder is packed into $OUT/gpu-check.tgz and the op
# tables (distance-*.md) are copied next to it: a handful of files, as the device tool brings back at most 8.
# $OUT defaults to ./gpu-out.
# Steps are independent: a failing step is logged and the next one still runs. Exit status: 0 only if all passed.
set -u
FINAL=${OUT:-$PWD/gpu-out}
OUT=$FINAL/all
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s"; tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step build "${BUILD_LIMIT:-240}" python3 -m pip install --no-build-isolation --no-deps -e .
# The CUDA-extension tests run in their own process: a crash there cannot hide the other results.
step tests "${TEST_LIMIT:-240}" python3 -m pytest -m gpu -v -rf --tb=short -p no:cacheprovider \
  --deselect tests/test_cuda_backend.py ${TEST_PATHS:-tests}
step tests_cuda "${TEST_LIMIT:-240}" python3 -m pytest -m gpu -v -rf --tb=short -p no:cacheprovider tests/test_cuda_backend.py
# CUDA-extension CPU gates on the real toolkit (ptxas: 0 spills, registers and shared memory per launch bounds;
# the table is printed into gates.log); the emulator sanitizer runs stay on the CPU CI.
step gates "${GATES_LIMIT:-180}" python3 -m pytest -v -s -rf --tb=short -p no:cacheprovider \
  tests/test_cuda_gates.py -k ptxas
# compute-sanitizer memcheck and racecheck of the cuda backend's kernels at a small shape, every precision.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step cuda_sanitizer "${SAN_LIMIT:-240}" bash -c 'for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 python3 -c "
import torch, protokern._C
z = torch.rand(2, 67, 70, device=\"cuda\").transpose(1, 2).contiguous().transpose(1, 2)
p = torch.rand(130, 67, device=\"cuda\")
z2, p2 = torch.rand(24, 128, 49, device=\"cuda\"), torch.rand(4000, 128, device=\"cuda\")  # p-resident plan
for zz, pp in ((z, p), (z2, p2)):
  for prec in (\"highest\", \"high\", \"medium\"):
    sim, dist, idx = torch.ops.protokern_C.forward(zz, pp, 1e-4, prec)
    g = torch.randn_like(sim)
    torch.ops.protokern_C.backward(g, g, zz, pp, idx, dist, 1e-4)
torch.cuda.synchronize(); print(\"$tool done\")" || exit 1; done'
fi
# The op table (58 rows with the 2x2 / cosine variants and the reference rows; it writes its JSON and Markdown after
# every shape, so a timeout keeps the shapes done) apart from the profile and push, which a slow table must not starve.
step bench "${BENCH_LIMIT:-240}" python3 benchmarks/distance.py --out "$OUT"
step bench_profile_push "${PROFILE_LIMIT:-120}" bash -c "python3 benchmarks/profile_op.py; python3 benchmarks/push.py --out '$OUT'"
# Whole training steps (benchmarks/train_step.py): ResNet34 only here (compiling the three trunks takes longer);
# the table is printed into train.log.
step train "${TRAIN_LIMIT:-150}" python3 benchmarks/train_step.py --backbones resnet34 --steps 20 --warmup 5
cp "$OUT"/distance-*.md "$FINAL"/ 2>/dev/null
tar -czf "$FINAL/gpu-check.tgz" -C "$OUT" . && rm -rf "$OUT"
ls -l "$FINAL"
exit $status
