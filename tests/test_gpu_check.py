"""benchmarks/gpu_check.sh's plumbing, on the CPU: every GPU tool it calls is a stub here, so what is tested is
the script itself (step order and selection, the deadline, packing after every step, what $OUT holds), so that
the one GPU run a session may get does not fail on the script."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["build", "tests_cuda", "bench", "ncu", "ncu_large", "tests", "sanitizer", "sweep", "stalls", "profile", "push",
         "train", "gates"]

PYTHON_STUB = r"""#!/usr/bin/env bash
echo "python3 $*" >> "$STUB_LOG"
case "$*" in
  *--deselect*) exit "${STUB_TESTS_RC:-0}";;
  *test_cuda_backend.py*) sleep "${STUB_CUDA_TESTS_SLEEP:-0}";;
  *distance.py*) args="$*"; out=${args##*--out }; mkdir -p "$out"; echo "| op table |" > "$out/distance-stub.md"; echo "{}" > "$out/distance-stub.json";;
  *triton_sweep.py*) args="$*"; out=${args##*--out }; echo "| sweep |" > "$out/triton-sweep-stub.md";;
esac
exit 0
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"python3": PYTHON_STUB}
    for tool in ("nvidia-smi", "nvcc", "ncu", "compute-sanitizer"):
        scripts[tool] = f'#!/usr/bin/env bash\necho "{tool} $*" >> "$STUB_LOG"\nexit 0\n'
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _env(tmp_path: Path, **env_extra: str) -> dict[str, str]:
    (tmp_path / "calls.log").touch()
    return dict(os.environ, PATH=f"{_stubs(tmp_path)}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
                TMPDIR=str(tmp_path), STUB_LOG=str(tmp_path / "calls.log"), **env_extra)


def _run(tmp_path: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    env = _env(tmp_path, **env_extra)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, tmp_path / "out", (tmp_path / "calls.log").read_text().splitlines()


def _packed(out: Path) -> set[str]:
    with tarfile.open(out / "gpu-check.tgz") as tar:
        return {Path(name).name for name in tar.getnames()}


def test_every_step_runs_in_order_and_is_packed(tmp_path):
    proc, out, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    # the op table one process per shape, its tables copied up; the device tool brings back <= 8 files
    assert files == [f"distance-shape{i}.md" for i in range(4)] + ["gpu-check.tgz", "summary.txt",
                                                                   "triton-sweep-stub.md"]
    assert {f"{s}.log" for s in STEPS} | {"summary.txt", "distance-stub.json", "distance-stub.md"} <= _packed(out)
    assert sum("distance.py --shape" in c for c in calls) == 4
    summary = (out / "summary.txt").read_text()
    assert [line.split(":")[0][3:] for line in summary.splitlines() if line.startswith("== ")] == STEPS
    assert all(f"== {s}: rc=0" in summary for s in STEPS)
    assert not list(tmp_path.glob("gpu-check.*")), "the work folder is left behind"
    # the ncu step profiles the op's kernels from benchmarks/profile_op.py's --ncu mode, the stalls step the
    # default precisions' ones with source counters, and reads its report back as pages
    assert any(c.startswith("ncu ") and "--profile-from-start off" in c and c.endswith("profile_op.py --ncu")
               for c in calls)
    assert any(c.startswith("ncu ") and "SourceCounters" in c and c.endswith("--cases cuda:high,triton:medium")
               for c in calls)
    assert any(c.startswith("ncu -i ") and "--page source" in c for c in calls)


def test_a_failing_step_fails_the_run_but_not_the_next_steps(tmp_path):
    proc, out, _ = _run(tmp_path, STUB_TESTS_RC="3")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "== tests: rc=3" in summary and "== gates: rc=0" in summary


def test_the_deadline_cuts_a_slow_step_skips_the_rest_and_keeps_what_ran(tmp_path):
    proc, out, calls = _run(tmp_path, DEADLINE_S="8", RESERVE_S="1", MIN_STEP_S="2", STUB_CUDA_TESTS_SLEEP="60")
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "== build: rc=0" in summary
    assert "== tests_cuda: rc=124 (cut at its" in summary
    assert all(f"== {s}: skipped" in summary for s in STEPS[2:])
    assert {"build.log", "tests_cuda.log"} <= _packed(out)
    assert not any("distance.py" in c for c in calls)


def test_a_run_killed_from_outside_still_leaves_the_steps_done(tmp_path):
    """The device tool kills a command at its limit: what $OUT holds then must already be packed."""
    env = _env(tmp_path, STUB_CUDA_TESTS_SLEEP="60")
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "test_cuda_backend.py" not in (tmp_path / "calls.log").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = tmp_path / "out"
    assert "build.log" in _packed(out)
    assert "== build: rc=0" in (out / "summary.txt").read_text()


def test_steps_selects_a_subset(tmp_path):
    proc, out, calls = _run(tmp_path, STEPS="bench gates")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert [line.split(":")[0][3:] for line in summary.splitlines() if line.startswith("== ")] == ["bench", "gates"]
    assert not any("pip install" in c for c in calls)
    assert (out / "distance-shape0.md").exists()
