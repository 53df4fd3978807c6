"""make_loader: batching, seeded shuffling, worker / pinning settings, workers' SIGTERM."""
import os
import signal
import subprocess
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from protokern.data import make_loader
from protokern.data.cache import ImageView


def data(n=10):
    return TensorDataset(torch.arange(n).float().view(n, 1), torch.arange(n))


def test_batches_and_seeded_shuffle():
    loader = make_loader(data(), batch_size=4, shuffle=False, num_workers=0)
    assert [len(y) for _, y in loader] == [4, 4, 2]
    assert loader.pin_memory == torch.cuda.is_available()
    assert make_loader(data(), 4, False, num_workers=0, drop_last=True).__len__() == 2
    order = lambda seed: torch.cat([y for _, y in make_loader(data(), 4, True, num_workers=0, seed=seed)])
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(10))


def test_the_seeded_order_does_not_depend_on_the_workers():
    """Every epoch's order from the seed alone: the loader's own generator also draws the workers' base seed
    (every epoch without persistent workers, once with them), which put the orders out of step from epoch 2."""
    def epochs(workers):
        loader = make_loader(data(12), 4, True, num_workers=workers, seed=7)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(3)]

    no_workers = epochs(0)
    assert epochs(1) == no_workers and len({tuple(e) for e in no_workers}) == 3  # and a new order each epoch


def test_workers_persist():
    loader = make_loader(data(), batch_size=5, shuffle=False, num_workers=1)
    assert loader.persistent_workers and loader.num_workers == 1
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(10))


class _WorkerPids(torch.utils.data.Dataset):
    """Items are the pid of the worker that made them, a little slowly."""

    def __len__(self):
        return 48

    def __getitem__(self, index):
        time.sleep(0.005)
        return os.getpid()


@pytest.fixture
def ctrl_c_kills():
    """Ctrl-C as Python has it in a terminal (KeyboardInterrupt), for this test's workers to inherit: a shell
    starts a background job with SIGINT ignored, and the tests would then pass whatever worker_init does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def ctrl_c_stops(ctrl_c_kills):
    """This process takes Ctrl-C as a stop, as python -m protokern.train does (utils.STOP_SIGNALS)."""
    from protokern.utils import STOP_SIGNALS

    STOP_SIGNALS.add(signal.SIGINT)
    yield
    STOP_SIGNALS.discard(signal.SIGINT)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (Linux)")
def test_workers_leave_a_foreign_sigterm_to_the_main_process(ctrl_c_stops):
    """A SIGTERM from another process (a scheduler signalling the whole job) and, where the main process takes it
    as a stop, a Ctrl-C (SIGINT, which a terminal sends to every process of its group: it ended a worker
    mid-fetch) do not kill a worker; a SIGTERM from the main process (its shutdown) ends it at once, with exit
    status 0 (no "worker is killed" error)."""
    loader = make_loader(_WorkerPids(), batch_size=1, shuffle=False, num_workers=2)
    batches = iter(loader)
    served = [int(next(batches)) for _ in range(6)]
    workers = {w.pid: w for w in batches._workers}
    assert set(served) == set(workers)
    for pid in workers:  # sent by the `kill` process, not by the main process
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        subprocess.run(["kill", "-INT", str(pid)], check=True)
    time.sleep(0.2)
    assert len([int(pid) for pid in batches]) == 42 and all(w.is_alive() for w in workers.values())
    for pid, worker in workers.items():
        os.kill(pid, signal.SIGTERM)
        worker.join(timeout=10)
        assert worker.exitcode == 0


@pytest.mark.parametrize("start", ["fork", "forkserver", "spawn"])
def test_workers_leave_ctrl_c_to_a_main_process_stopping_on_it_under_every_start_method(ctrl_c_stops, start):
    """The decision is made in the main process when the loader is built (forkserver, Python 3.14's default on
    Linux, and spawn start workers that import protokern afresh: they never saw STOP_SIGNALS filled)."""
    loader = make_loader(_WorkerPids(), batch_size=1, shuffle=False, num_workers=2)
    loader.multiprocessing_context = start
    batches = iter(loader)
    served = [int(next(batches)) for _ in range(6)]  # both workers started (past their worker_init)
    workers = list(batches._workers)
    assert set(served) == {w.pid for w in workers}
    for worker in workers:
        subprocess.run(["kill", "-INT", str(worker.pid)], check=True)
    time.sleep(0.3)
    assert len([int(pid) for pid in batches]) == 42 and all(w.is_alive() for w in workers)
    del batches

def test_ctrl_c_ends_workers_where_nothing_takes_it_as_a_stop(ctrl_c_kills):
    """In a notebook or a script of one's own, Ctrl-C ends the loader's workers as torch's own (a worker stuck in
    a dataset's __getitem__ would otherwise outlive everything but SIGKILL)."""
    loader = make_loader(_WorkerPids(), batch_size=1, shuffle=False, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = list(batches._workers)
    for worker in workers:
        subprocess.run(["kill", "-INT", str(worker.pid)], check=True)
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()
    del batches


class _Files(torch.utils.data.Dataset):
    """A stand-in file dataset: 4 uint8 images decoded on access."""

    targets, classes, image_size = [0, 1, 0, 1], ["a", "b"], 4

    def __len__(self):
        return 4

    def decode(self, index):
        return torch.full((3, 4, 4), index, dtype=torch.uint8)


def test_a_streamed_view_keeps_its_workers_and_a_cached_one_has_none():
    """An ImageView without a cache (--data-cache off, or only bad images left out) decodes files in __getitem__:
    the loader keeps the workers asked for; a cached view (items gathered in this process) gets none."""
    streamed = ImageView(_Files(), [0, 1, 2, 3], [])
    cached = ImageView(_Files(), [0, 1, 2, 3], [], images=torch.zeros(4, 3, 4, 4, dtype=torch.uint8))
    assert not streamed.cached and cached.cached
    assert make_loader(streamed, 2, shuffle=False, num_workers=2).num_workers == 2
    assert make_loader(cached, 2, shuffle=False, num_workers=2).num_workers == 0


@pytest.mark.parametrize("workers", [-1, -2])
def test_negative_workers_are_refused_by_make_loader(workers):
    """num_workers=-1 is refused with make_loader's message (naming the value), as -2 is, not left to
    DataLoader's own error."""
    data = TensorDataset(torch.zeros(4, 1), torch.arange(4))
    with pytest.raises(ValueError, match=rf"^num_workers must be >= 0, got {workers}$"):
        make_loader(data, 2, shuffle=False, num_workers=workers)
