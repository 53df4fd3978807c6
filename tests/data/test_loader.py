"""make_loader: batching, seeded shuffling, worker / pinning settings."""
import torch
from torch.utils.data import TensorDataset

from protokern.data import make_loader


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


def test_workers_persist():
    loader = make_loader(data(), batch_size=5, shuffle=False, num_workers=1)
    assert loader.persistent_workers and loader.num_workers == 1
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(10))
