"""The interpreter's memory checks (tests/triton_memcheck.py) catch what they are there to catch."""

import pytest
import torch

from tests import triton_memcheck


@pytest.fixture
def interpreted():
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the checker patches the CPU interpreter (TRITON_INTERPRET=1)")
    if not triton_memcheck.install():
        pytest.skip("this Triton's interpreter lacks the hooks the checker patches")
    import triton
    import triton.language as tl

    @triton.jit
    def copy(x, y, shift, n, N: tl.constexpr, MASKED: tl.constexpr):
        o = tl.arange(0, N)
        if MASKED:
            tl.store(y + o, tl.load(x + o + shift, mask=o + shift < n, other=0.0), mask=o < n)
        else:
            tl.store(y + o, tl.load(x + o + shift))

    return copy


def test_spans_of_views():
    base = torch.zeros(4, 6)
    assert triton_memcheck.tensor_span(base) == (base.data_ptr(), base.data_ptr() + 96)
    col = base[1:3, 2]  # elements 8 and 14 of the storage
    assert triton_memcheck.tensor_span(col) == (base.data_ptr() + 32, base.data_ptr() + 60)
    assert triton_memcheck.tensor_span(base.t()) == triton_memcheck.tensor_span(base)
    assert triton_memcheck.tensor_span(base[:0]) is None


def test_in_bounds_and_masked_accesses_pass(interpreted):
    x, y = torch.arange(8.0), torch.empty(8)
    interpreted[(1,)](x, y, 0, 8, N=8, MASKED=False)
    assert torch.equal(x, y)
    interpreted[(1,)](x, y, 3, 8, N=8, MASKED=True)  # lanes past the end masked off: no access
    assert torch.equal(y, torch.tensor([3.0, 4, 5, 6, 7, 0, 0, 0]))


def test_out_of_bounds_load_fails_inside_the_storage(interpreted):
    storage = torch.arange(16.0)
    x, y = storage[:8], torch.empty(8)  # x + 8.. is still the storage, not the view passed
    with pytest.raises(Exception, match=r"triton kernel copy: load of 3 element\(s\) outside its tensor arguments"):
        interpreted[(1,)](x, y, 3, 8, N=8, MASKED=False)


def test_out_of_bounds_store_fails(interpreted):
    x, storage = torch.arange(8.0), torch.zeros(16)
    y = storage[:4]
    with pytest.raises(Exception, match=r"triton kernel copy: store of 4 element\(s\) outside"):
        interpreted[(1,)](x, y, 0, 8, N=8, MASKED=False)
    assert torch.equal(storage[4:], torch.zeros(12))  # nothing written past the view


def test_launcher_buffers_start_poisoned(interpreted):
    """The kernel launchers' torch.empty / empty_like hand out poisoned buffers (a value no kernel wrote is the same
    wrong value every run); other code's torch.empty is untouched."""
    from protokern.kernels import prototype_distance as K

    assert (K.torch.empty((2, 3)) == triton_memcheck.POISON_FLOAT).all()
    assert (K.torch.empty_like(torch.zeros(4, dtype=torch.int32)) == triton_memcheck.POISON_INT).all()
    assert K.torch.float32 is torch.float32 and torch.empty is not K.torch.empty
