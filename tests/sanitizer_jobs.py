"""The CUDA emulator's sanitizer builds (csrc/emu/sanitize_main.cpp under TSan, and under ASan + UBSan), run
in background threads: each is a single-threaded g++ build and run of a few minutes, so they use the second
core while the Python emulator check (tests/test_cuda_backend.py) runs, instead of after it.

``start(workdir)`` launches both once per session (tests/conftest.py: the ``sanitizer_jobs`` fixture);
``tests/test_cuda_gates.py::test_emulator_under_sanitizer`` waits for its job and checks the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
EMU = CSRC / "emu"

SANITIZERS = {
    "thread": ["-fsanitize=thread"],
    "address+undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 second_deadlock_stack=1",
       "ASAN_OPTIONS": "halt_on_error=1 detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1"}


def gxx_ok() -> str | None:
    """None if g++ >= 11 is here, else why not."""
    if shutil.which("g++") is None:
        return "needs g++"
    version = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    if int(version.split(".")[0] or 0) < 11:
        return f"needs g++ >= 11 for <barrier>, found {version}"
    return None


def build_and_run(sanitizer: str, workdir: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess | None]:
    """(build, run) of the emulator's sanitizer driver; run is None when the build failed."""
    exe = workdir / f"emu_{sanitizer.replace('+', '_')}"
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-pthread", *SANITIZERS[sanitizer], f"-I{EMU / 'fake'}", f"-I{EMU}",
           f"-I{CSRC}", str(EMU / "harness.cpp"), str(EMU / "sanitize_main.cpp"), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        return built, None
    return built, subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=1200)


def start(workdir: Path) -> dict[str, Future]:
    """Both sanitizer jobs, started now in background threads (the pool is not waited for on exit)."""
    pool = ThreadPoolExecutor(max_workers=len(SANITIZERS), thread_name_prefix="sanitizer")
    jobs = {name: pool.submit(build_and_run, name, workdir) for name in SANITIZERS}
    pool.shutdown(wait=False)
    return jobs
