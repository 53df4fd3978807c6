"""protokern.backends: which backends run here, and what 'auto' picks when a fused one cannot."""
import logging
import subprocess

import pytest
import torch

import protokern
from protokern import _cuda, backends


class _TritonDriver:
    """Stands in for ``triton.runtime.driver``: building Triton's C utilities fails with ``error``."""

    def __init__(self, error):
        self.error = error

    @property
    def active(self):
        raise self.error


@pytest.fixture
def gpu_without_toolchain(monkeypatch):
    """A machine that reports a GPU, without the CUDA extension, whose Triton cannot build its C launcher."""
    triton = pytest.importorskip("triton")

    def install(error):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(_cuda, "available", lambda: "protokern._C not built (a test)")
        monkeypatch.setattr(triton.runtime, "driver", _TritonDriver(error))
        monkeypatch.setattr(backends, "_RESOLVED", {})
        backends._triton_gpu_reason.cache_clear()

    yield install
    backends._triton_gpu_reason.cache_clear()


@pytest.mark.parametrize("error, detail", [
    (RuntimeError("Failed to find C compiler. Please specify via CC environment variable or set "
                  "triton.knobs.build.impl."), "Failed to find C compiler"),
    (subprocess.CalledProcessError(1, ["/usr/bin/gcc", "main.c", "-O3"]), "gcc failed with exit status 1"),
])
def test_triton_without_a_c_toolchain_is_unavailable_on_gpus(gpu_without_toolchain, caplog, error, detail):
    """No C compiler or no Python headers (a slim container): Triton is reported unavailable with the reason,
    'auto' falls back to torch with one warning naming it, and backend='triton' is a one-line error."""
    gpu_without_toolchain(error)
    reason = protokern.available_backends("cuda")["triton"]
    assert detail in reason and "C compiler" in reason and "\n" not in reason
    with caplog.at_level(logging.INFO, "protokern"):
        assert backends.resolve("auto", "cuda") == "torch"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and detail in warned[0].getMessage() and "'torch'" in warned[0].getMessage()
    with pytest.raises(RuntimeError, match="backend 'triton' is not available for cuda tensors: triton cannot"):
        backends.resolve("triton", "cuda")


def test_cpu_tensors_pick_torch_quietly(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_RESOLVED", {})
    with caplog.at_level(logging.INFO, "protokern"):
        assert backends.resolve("auto", "cpu") == "torch"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.gpu
def test_triton_builds_its_launcher_on_this_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert backends._triton_gpu_reason() is None
