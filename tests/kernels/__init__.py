"""Tests of the Triton kernels (protokern.kernels) and their CPU gates."""

import pytest

import protokern

# Kernel launches on CPU tensors: the interpreter only (tests/conftest.py sets it where no GPU is visible).
needs_triton_cpu = pytest.mark.skipif(
    protokern.available_backends("cpu")["triton"] is not None, reason="Triton interpreter not enabled"
)
