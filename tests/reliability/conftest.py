"""Shared pieces of the reliability tests: a tiny finished run (built once) and helpers."""

import importlib
import os
import shutil

import pytest

from tests.train.conftest import TINY_ARGS

TRAIN_MAIN = importlib.import_module("protokern.train.main")


def run_args(run_dir, *extra) -> list[str]:
    """Flags of the tiny 4-step run (warm, joint, push, last) into ``run_dir``, without explanations."""
    return TINY_ARGS + ["--out", str(run_dir), "--no-explain", *extra]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished tiny run (last.pt, best.pt, push records); copy it before changing anything."""
    from protokern.train import main

    run = tmp_path_factory.mktemp("finished") / "run"
    main(run_args(run))
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of :func:`finished_run`."""
    return shutil.copytree(finished_run, tmp_path / "run")


def stderr_line(capsys) -> str:
    """The one line a CLI error printed on stderr (fails if there is more, or a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_temps(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".tmp")]
