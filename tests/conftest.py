"""Test configuration: Triton runs under its CPU interpreter unless a GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the cores shared out, not N x cores threads spinning
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from tests import triton_memcheck  # noqa: E402

    triton_memcheck.install()  # loads and stores inside their launch's tensors; the launchers' buffers poisoned


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sanitizer_jobs(tmp_path_factory):
    """The CUDA emulator's sanitizer builds and runs (tests/sanitizer_jobs.py), started in the background the
    first time a test asks for them; None without a suitable g++."""
    from tests import sanitizer_jobs as jobs

    if jobs.gxx_ok() is not None:
        return None
    return jobs.start(tmp_path_factory.mktemp("sanitizers"))
