"""protokern.train.distributed's pure parts: a process's place, its device, its share of the data."""

import torch

from protokern.train import distributed


def test_the_main_process_is_global_rank_0():
    assert distributed.DistInfo(0, 4, 0).is_main
    assert not distributed.DistInfo(2, 4, 0).is_main  # rank 2: the first process of the second node


def test_cuda_without_an_index_is_this_process_local_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "checked_device", torch.device)  # no GPU needed to name one
    assert distributed.resolve_device("cuda", 3) == torch.device("cuda:3")
    assert distributed.resolve_device("cuda:1", 3) == torch.device("cuda:1")
    assert distributed.resolve_device("cpu", 3) == torch.device("cpu")


def test_the_shards_hold_every_sample_once():
    data = list(range(10))
    for world in (1, 3, 4):
        parts = [list(distributed.shard(data, distributed.DistInfo(r, world, r))) for r in range(world)]
        assert sorted(x for part in parts for x in part) == data
