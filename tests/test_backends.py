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


@pytest.fixture
def gpu_with_extension(monkeypatch):
    """A machine that reports one sm_80 GPU, with the CUDA extension built and loaded, and a working Triton;
    ``install(probe_error)`` makes the extension's one-element probe raise ``probe_error`` (None: it runs)."""

    def install(probe_error, built=True):
        def probe(device):
            if probe_error is not None:
                raise probe_error

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(_cuda, "_load", lambda: None if built else "protokern._C not built (a test)")
        monkeypatch.setattr(_cuda, "built", lambda: built)
        monkeypatch.setattr(_cuda, "_probe", probe)
        monkeypatch.setattr(backends, "_triton_gpu_reason", lambda: None)
        monkeypatch.setattr(backends, "_RESOLVED", {})
        _cuda._device_reason.cache_clear()

    yield install
    _cuda._device_reason.cache_clear()


def test_a_cuda_build_for_other_gpus_is_unavailable_and_auto_warns(gpu_with_extension, caplog):
    """The extension built for other GPUs (no kernel image for this one): the cuda backend is unavailable with
    the CUDA error and the rebuild hint, 'auto' takes triton with one warning naming it, and backend='cuda' is a
    one-line error instead of a CUDA error at the first call."""
    gpu_with_extension(RuntimeError("CUDA error: no kernel image is available for execution on the device\n"
                                    "CUDA kernel errors might be asynchronously reported at some other API call"))
    reason = protokern.available_backends("cuda")["cuda"]
    assert "no kernel image" in reason and "sm_80" in reason and "TORCH_CUDA_ARCH_LIST including 8.0" in reason
    assert "\n" not in reason
    with caplog.at_level(logging.INFO, "protokern"):
        assert backends.resolve("auto", "cuda") == "triton"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'triton'" in warned[0] and "cuda: protokern._C cannot run on cuda:0" in warned[0]
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cuda tensors: protokern._C cannot"):
        backends.resolve("cuda", "cuda")


@pytest.mark.parametrize("built", [True, False])
def test_auto_on_gpus_is_quiet_when_it_gets_what_the_install_allows(gpu_with_extension, caplog, built):
    """The extension runs: 'auto' takes it. No extension (installed without a CUDA toolkit): triton, as
    expected, logged at INFO only."""
    gpu_with_extension(None, built=built)
    reason = protokern.available_backends("cuda")["cuda"]
    assert reason is None if built else "not built" in reason
    with caplog.at_level(logging.INFO, "protokern"):
        assert backends.resolve("auto", "cuda") == ("cuda" if built else "triton")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.gpu
def test_the_cuda_extension_runs_on_this_gpu():
    if not torch.cuda.is_available() or not _cuda.built():
        pytest.skip("needs a CUDA GPU and the built extension")
    assert _cuda._device_reason(torch.cuda.current_device()) is None


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    from protokern.backends import available_backends

    for value, why in (("0", True), ("", True), ("1", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        reason = available_backends("cpu")["triton"]
        assert (reason is not None and "TRITON_INTERPRET=1" in reason) if why else reason is None, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in available_backends("cpu")["triton"]
    assert available_backends("cpu")["torch"] is None and "CUDA tensors only" in available_backends("cpu")["cuda"]
