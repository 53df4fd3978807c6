"""The benchmarks are marked ``bench`` and left out of the default run (pytest.ini's ``-m "not bench"``,
which a ``-m`` on the command line, e.g. ``-m bench`` or ``-m gpu``, replaces)."""

import os
import subprocess
import sys

from tests.bench import test_bench_op, test_bench_push

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmarks_carry_the_marker():
    for module in (test_bench_op, test_bench_push):
        assert module.pytestmark.name == "bench"


def test_default_run_leaves_the_benchmarks_out():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    files = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    assert files == {"tests/bench/test_selection.py"}
    assert "deselected" in out.stdout
