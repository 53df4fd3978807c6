"""Memory checks for the Triton kernels under the CPU interpreter (TRITON_INTERPRET=1).

* Bounds: every load and store a kernel makes (the lanes whose mask is true) must lie inside the span of one of
  its launch's tensor arguments, the view passed and not merely its storage: an out-of-bounds access then fails a
  CPU test with the kernel's name, where on a GPU it would read a neighbour's memory without a word
  (compute-sanitizer sees only whole allocations, and the caching allocator's blocks are larger still).
* Unwritten memory: the launchers' ``torch.empty`` / ``torch.empty_like`` buffers (outputs and workspaces of
  kernels/prototype_distance.py) start poisoned, POISON_FLOAT for floats and POISON_INT for integers: a result
  read from a place no kernel wrote is the same wrong value on every run (an index far out of bounds), not
  whatever a fresh CPU allocation happens to hold (often zeros, or a previous call's right answer). Finite, not
  NaN: the non-finite tests expect NaN in places, where a NaN poison hid a missing store that stale memory
  showed (NOTES.md, "Triton v17").

tests/conftest.py installs both for the whole session when the interpreter runs; ``install`` returns False where
this Triton's interpreter lacks the hooks it patches.
"""

from __future__ import annotations

import numpy as np
import torch

POISON_INT = -(2**30)  # an unwritten index or count: a gather or place far outside any tensor
POISON_FLOAT = -7.25e29  # an unwritten value: finite and far from any result; its square is inf
_launch = {"name": "", "starts": np.zeros(0, np.uint64), "ends": np.zeros(0, np.uint64)}


def tensor_span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, last byte + 1) of the elements of view ``t``; None if it has none."""
    if t.numel() == 0:
        return None
    size = t.element_size()
    low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr() + size * low, t.data_ptr() + size * (high + 1)


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for item in arg:
            yield from _tensors(item)


def set_launch(name: str, args) -> None:
    """The kernel ``name`` is about to run on ``args``: its accesses are checked against their spans (merged into
    disjoint intervals)."""
    spans = sorted(span for t in _tensors(list(args)) if (span := tensor_span(t)) is not None)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    _launch["name"] = name
    _launch["starts"] = np.array([lo for lo, _ in merged], dtype=np.uint64)
    _launch["ends"] = np.array([hi for _, hi in merged], dtype=np.uint64)


def check(ptrs: np.ndarray, mask: np.ndarray | None, itemsize: int, kind: str) -> None:
    """Raise if an address of ``ptrs`` where ``mask`` is true (all where None) is outside the launch's spans."""
    addrs = np.asarray(ptrs, dtype=np.uint64).ravel()
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).ravel()]
    if addrs.size == 0:
        return
    starts, ends = _launch["starts"], _launch["ends"]
    inside = np.zeros(addrs.shape, dtype=bool)
    if starts.size:
        i = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        inside = (i >= 0) & (addrs + np.uint64(itemsize) <= ends[np.maximum(i, 0)])
    if not np.all(inside):
        bad = addrs[~inside]
        raise IndexError(f"triton kernel {_launch['name']}: {kind} of {bad.size} element(s) outside its tensor "
                         f"arguments (first at {int(bad[0]):#x}; arguments span {_spans_text()})")


def _spans_text() -> str:
    return ", ".join(f"[{int(lo):#x}, {int(hi):#x})" for lo, hi in zip(_launch["starts"], _launch["ends"]))


def poisoned(t: torch.Tensor) -> torch.Tensor:
    """``t`` filled with POISON_FLOAT (floating point) or POISON_INT (integers)."""
    return t.fill_(POISON_FLOAT if t.is_floating_point() else POISON_INT)


class _PoisoningTorch:
    """The torch module as the kernel launchers see it, but with ``empty`` / ``empty_like`` poisoned."""

    def __init__(self, module):
        self._torch = module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def empty(self, *args, **kwargs):
        return poisoned(self._torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return poisoned(self._torch.empty_like(*args, **kwargs))


def install() -> bool:
    """Poison the launchers' fresh buffers, and patch the interpreter (once) so that every launch records its
    arguments' spans and every masked load and store is checked against them. False (buffers still poisoned) if
    this Triton's interpreter does not have the hooks the bounds check patches."""
    from triton.runtime import interpreter as interp

    from protokern.kernels import prototype_distance

    if not isinstance(prototype_distance.torch, _PoisoningTorch):
        prototype_distance.torch = _PoisoningTorch(torch)

    executor, builder = getattr(interp, "GridExecutor", None), getattr(interp, "InterpreterBuilder", None)
    hooks = (getattr(executor, "_init_args_hst", None), getattr(builder, "create_masked_load", None),
             getattr(builder, "create_masked_store", None), getattr(interp, "_get_np_dtype", None))
    if any(hook is None for hook in hooks):
        return False
    if getattr(executor, "_protokern_bounds", False):
        return True
    init_args, masked_load, masked_store, np_dtype = hooks

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        set_launch(getattr(self.fn, "__name__", "?"), list(args_hst) + list(kwargs_hst.values()))
        return args_hst, kwargs_hst

    def create_masked_load(self, ptrs, mask, other, *rest):
        check(ptrs.data, mask.data, np_dtype(ptrs.get_element_ty()).itemsize, "load")
        return masked_load(self, ptrs, mask, other, *rest)

    def create_masked_store(self, ptrs, value, mask, *rest):
        check(ptrs.data, mask.data, np_dtype(ptrs.get_element_ty()).itemsize, "store")
        return masked_store(self, ptrs, value, mask, *rest)

    executor._init_args_hst = init_args_hst
    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    executor._protokern_bounds = True
    return True
