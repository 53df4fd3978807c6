#!/usr/bin/env bash
# The one prepared GPU check: build the CUDA extension, run the GPU tests, the op benchmark, the per-kernel
# counters and the sanitizers. Run from the repository root on a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh                        # every step, most important first, within DEADLINE_S
#   STEPS="build bench ncu" bash benchmarks/gpu_check.sh  # a subset (a second call on a warm machine)
#
# Steps, in this order: build, tests_cuda, bench, ncu, ncu_large, tests, sanitizer, sweep, stalls, profile, push,
# train, gates. Each is
# independent: a failing step is logged and the next one still runs. The whole run keeps to DEADLINE_S seconds
# (default 530): a step gets min(its own limit, what is left), a step with under MIN_STEP_S (20) s left is
# skipped, and all of it is killed at its limit (`timeout -k`), so the results always come back. Every step writes NAME.log (the
# benchmarks their JSON / Markdown tables too) into a work folder that is packed into $OUT/gpu-check.tgz AFTER
# EVERY STEP; $OUT also gets summary.txt (each step's status and time) and the op tables (distance-*.md). So $OUT
# holds a handful of files whenever the run stops (the device tool brings back at most 8). $OUT defaults to
# ./gpu-out. Exit status: 0 only if every step ran and passed.
set -u
FINAL=${OUT:-$PWD/gpu-out}
DEADLINE=${DEADLINE_S:-530}
STEPS=${STEPS:-build tests_cuda bench ncu ncu_large tests sanitizer sweep stalls profile push train gates}
RESERVE=${RESERVE_S:-8}     # seconds kept for the last packing
MIN_STEP=${MIN_STEP_S:-20}  # a step with less time than this left is skipped
mkdir -p "$FINAL"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1
status=0

pack() {
  tar -czf "$WORK.tgz" -C "$WORK" . && mv -f "$WORK.tgz" "$FINAL/gpu-check.tgz"
  cp "$WORK"/summary.txt "$FINAL"/
  cp "$WORK"/distance-*.md "$WORK"/triton-sweep-*.md "$FINAL"/ 2>/dev/null
  return 0
}

step() {  # step NAME LIMIT_S CMD...: runs CMD if NAME is in $STEPS, within the deadline
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0;; esac
  local left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt "$MIN_STEP" ]; then
    echo "== $name: skipped (${left}s left before the deadline)" | tee -a "$WORK/summary.txt"
    status=1; pack; return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local verdict="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="rc=$rc (cut at its ${limit}s limit)"
  echo "== $name: $verdict in $((SECONDS - t0))s" | tee -a "$WORK/summary.txt"
  tail -n 25 "$WORK/$name.log"
  [ $rc -eq 0 ] || status=1
  pack
}

{ date -u; git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -2
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
  echo "deadline ${DEADLINE}s, steps: $STEPS"; } | tee "$WORK/summary.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

step build "${BUILD_LIMIT:-240}" python3 -m pip install --no-build-isolation --no-deps -e .
# The CUDA-extension tests in their own process: a crash there cannot hide the other results.
step tests_cuda "${TEST_LIMIT:-150}" python3 -m pytest -m gpu -v -rf --tb=short -p no:cacheprovider \
  tests/test_cuda_backend.py
# The op table, one process per shape (a fault in one shape's kernels cannot take the others' rows with it;
# each writes its JSON and Markdown under bench-N/, its Markdown copied up as distance-shapeN.md). The prototype
# kinds (2x2, cosine) and channels_last features (nhwc) at the CUB shape only.
export WORK
step bench "${BENCH_LIMIT:-240}" bash -c 'rc=0; i=0
  for s in 80,128,7,7,2000 128,256,14,14,2000 64,128,7,7,10000 32,512,28,28,2000; do
    v=log; [ $i -eq 0 ] && v=log,2x2,cosine,nhwc
    echo "== shape $s"; python3 benchmarks/distance.py --shape $s --variants $v --out "$WORK/bench-$i" || rc=1
    cp "$WORK"/bench-$i/distance-*.md "$WORK/distance-shape$i.md" 2>/dev/null; i=$((i + 1))
  done; exit $rc'
# Per-kernel counters (issue 9: instructions, issue activity, L2 bytes, tensor-pipe use) of one fwd+bwd per case
# at the CUB shape, clocks left alone; sections, not single metrics, so that no metric name can fail the run.
if command -v ncu >/dev/null 2>&1; then
  step ncu "${NCU_LIMIT:-120}" ncu --clock-control none --profile-from-start off --nvtx \
    -k regex:"forward_kernel|_rescore_kernel|backward_kernel|_grad_|_patch_norms|_won_" --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section InstructionStats python3 benchmarks/profile_op.py --ncu
  # The cuda forward at 14x14 (4-5x its static floor in v12): its L1/L2 sectors and throughput (NOTES.md "v16").
  step ncu_large "${NCU_LARGE_LIMIT:-60}" ncu --clock-control none --profile-from-start off --nvtx \
    -k regex:"forward_kernel" --section SpeedOfLight --section MemoryWorkloadAnalysis \
    python3 benchmarks/profile_op.py --ncu --shape 128,256,14,14,2000 --cases cuda:high
fi
step tests "${TEST_LIMIT:-200}" python3 -m pytest -m gpu -v -rf --tb=short -p no:cacheprovider \
  --deselect tests/test_cuda_backend.py ${TEST_PATHS:-tests}
# compute-sanitizer memcheck and racecheck of the cuda backend's kernels at small shapes, every precision.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer "${SAN_LIMIT:-150}" bash -c 'for tool in memcheck racecheck; do
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
# Triton launch configurations against the launcher's choice (benchmarks/triton_sweep.py), at the default precision.
step sweep "${SWEEP_LIMIT:-180}" python3 benchmarks/triton_sweep.py --out "$WORK"
# Where the default precision's kernels stall (CUB shape, one fwd+bwd of cuda and triton): ncu's warp-state and
# source-counter sections (stall reasons, and per SASS instruction with --page source where this ncu has it).
if command -v ncu >/dev/null 2>&1; then
  step stalls "${STALLS_LIMIT:-100}" bash -c 'set -e
    ncu --clock-control none --profile-from-start off --import-source yes -f -o "$WORK/stalls" \
      -k regex:"forward_kernel|_rescore_kernel|backward_kernel|_grad_|_won_" --section SpeedOfLight --section WarpStateStats \
      --section SourceCounters python3 benchmarks/profile_op.py --ncu --cases cuda:high,triton:medium
    ncu -i "$WORK/stalls.ncu-rep" --page details > "$WORK/stalls-details.txt"
    ncu -i "$WORK/stalls.ncu-rep" --page raw --csv > "$WORK/stalls-raw.csv" || echo "no raw page"
    ncu -i "$WORK/stalls.ncu-rep" --page source --csv --print-source sass > "$WORK/stalls-sass.csv" ||
      echo "no --page source --print-source sass here"
    gzip -f "$WORK/stalls-sass.csv" 2>/dev/null || true; rm -f "$WORK/stalls.ncu-rep"; tail -n 60 "$WORK/stalls-details.txt"'
fi
step profile "${PROFILE_LIMIT:-90}" python3 benchmarks/profile_op.py
step push "${PUSH_LIMIT:-90}" python3 benchmarks/push.py --out "$WORK"
# Whole training steps (benchmarks/train_step.py): ResNet34 only here (compiling the three trunks takes longer).
step train "${TRAIN_LIMIT:-150}" python3 benchmarks/train_step.py --backbones resnet34 --steps 20 --warmup 5
# The CUDA-extension CPU gate on that machine's toolkit (ptxas: spills, registers, shared memory); CI runs it too.
step gates "${GATES_LIMIT:-90}" python3 -m pytest -v -s -rf --tb=short -p no:cacheprovider \
  tests/test_cuda_gates.py -k ptxas
echo "done in ${SECONDS}s, status $status" | tee -a "$WORK/summary.txt"
pack
rm -rf "$WORK"
ls -l "$FINAL"
exit $status
