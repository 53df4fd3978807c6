"""benchmarks/torch_backend_ab.py: runs against a git revision and reports bit-identical forwards for
identical code."""
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import torch_backend_ab

ROOT = Path(__file__).resolve().parents[1]


def test_ab_against_head(capsys):
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                                     capture_output=True).returncode:
        pytest.skip("needs a git checkout")
    torch_backend_ab.main(["--base", "HEAD", "--shape", "2,8,3,5", "--shape", "1,5,1,3", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert len(rows) == 2 and all("| True |" in row for row in rows)
