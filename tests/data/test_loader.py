"""make_loader: batching, seeded shuffling, worker / pinning settings, distributed sampler."""
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, TensorDataset

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


def test_distributed_sampler(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = make_loader(data(), batch_size=3, shuffle=True, num_workers=0, distributed=True, seed=3)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 3
        assert sorted(torch.cat([y for _, y in loader]).tolist()) == list(range(10))
    finally:
        dist.destroy_process_group()
