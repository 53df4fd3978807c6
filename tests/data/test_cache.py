"""The input pipeline (issue 11): decode-once uint8 cache, its choice, and batches served from it."""
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from protokern.data import CUB200, CachedBatches, ImageView, make_loader, prepare_images
from protokern.data import cache as cache_mod
from tests.data.test_cub import IMAGES, make_cub


@pytest.fixture()
def cub(tmp_path):
    make_cub(tmp_path, IMAGES * 3)  # 15 images: 9 train, 6 test
    return CUB200(tmp_path, "train", image_size=16)


def check_same(view, ds):
    assert len(view) == len(ds) and view.targets == ds.targets and view.paths == ds.paths
    for i in range(len(ds)):
        (x, y), (ref, label) = view[i], ds[i]
        assert x.dtype == torch.float32 and x.device.type == "cpu" and torch.equal(x, ref) and y == label
        assert torch.equal(view.part_locations(i), ds.part_locations(i))
    assert torch.equal(view.boxes, ds.boxes) and view.classes == ds.classes and view.image_ids == ds.image_ids


def test_cached_items_equal_streamed(cub):
    view = prepare_images(cub, "memory", progress=False, workers=2)
    assert isinstance(view, ImageView) and view.cached and view.images.dtype == torch.uint8
    assert view.images.shape == (len(cub), 3, 16, 16) and view.skipped == []
    check_same(view, cub)
    batch = next(iter(make_loader(view, 4, shuffle=False, num_workers=3)))  # batched gather, no workers
    ref = next(iter(make_loader(cub, 4, shuffle=False, num_workers=0)))
    assert torch.equal(batch[0], ref[0]) and torch.equal(batch[1], ref[1])
    assert make_loader(Subset(view, [0, 1]), 2, shuffle=False, num_workers=3).num_workers == 0


def test_view_follows_its_indices(cub):
    view = ImageView(cub, [4, 0, 2], ["gone.jpg"])  # streamed, three of the images
    assert view.targets == [cub.targets[i] for i in (4, 0, 2)] and view.skipped == ["gone.jpg"]
    assert torch.equal(view[0][0], cub[4][0]) and view.mapping(1) == cub.mapping(0)
    assert torch.equal(view.boxes, cub.boxes[[4, 0, 2]]) and torch.equal(view.part_locations(2), cub.part_locations(2))


@pytest.mark.parametrize("drop_last", [False, True])
def test_cached_batches_match_a_dataloader(cub, drop_last):
    view = prepare_images(cub, "memory", progress=False)
    sampler = DistributedSampler(view, num_replicas=1, rank=0, shuffle=True, seed=5)
    batches = CachedBatches(view, sampler, 4, "cpu", drop_last=drop_last)
    reference = DataLoader(cub, batch_size=4, sampler=DistributedSampler(cub, 1, 0, shuffle=True, seed=5),
                           drop_last=drop_last)
    for epoch in (0, 1):
        batches.sampler.set_epoch(epoch)
        reference.sampler.set_epoch(epoch)
        got, want = list(batches), list(reference)
        assert len(got) == len(want) == len(batches)
        for (x, y), (rx, ry) in zip(got, want):
            assert x.dtype == torch.float32 and torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(TypeError, match="cached ImageView"):
        CachedBatches(cub, sampler, 4, "cpu")


def test_cache_choice_on_a_gpu_takes_at_most_a_fifth_of_its_free_memory(cub, monkeypatch):
    """auto: the GPU while the images take <= 1/5 of its free memory (the training needs the rest), else the host."""
    need = cache_mod.cache_bytes(cub)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # (one process on the node)
    monkeypatch.setattr(cache_mod, "checked_device", lambda device: torch.device(device))  # no GPU here
    monkeypatch.setattr(cache_mod, "_available_host_memory", lambda: 2 * need)
    free = {}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10 * free["bytes"]))
    for free["bytes"], want in ((5 * need, "gpu"), (5 * need + 4, "gpu"), (5 * need - 1, "memory")):
        assert cache_mod.choose_cache(cub, "auto", "cuda:0") == want, free


def test_cache_choice(cub, monkeypatch):
    need = cache_mod.cache_bytes(cub)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # (one process on the node)
    assert need == len(cub) * 3 * 16 * 16
    monkeypatch.setattr(cache_mod, "_available_host_memory", lambda: 2 * need)
    assert cache_mod.choose_cache(cub, "auto", "cpu") == "memory"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on the node: two copies
    assert cache_mod.choose_cache(cub, "auto", "cpu") == "off"
    assert prepare_images(cub, "auto", device="cpu") is cub  # streams: returned as is
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert prepare_images(cub, "auto", device="cpu", progress=False).cached
    for mode in ("memory", "off"):
        assert cache_mod.choose_cache(cub, mode, "cpu") == mode
    with pytest.raises(ValueError, match="cache must be one of"):
        cache_mod.choose_cache(cub, "disk")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        prepare_images(cub, "gpu", device="cpu")
    if not torch.cuda.is_available():  # refused at once, not after decoding every image
        monkeypatch.setattr(cub, "decode", lambda i: pytest.fail("decoded"))
        with pytest.raises(ValueError, match="CUDA is not available"):
            prepare_images(cub, "gpu", device="cuda")
        monkeypatch.undo()
    view = prepare_images(cub, "memory", progress=False)
    assert prepare_images(view, "memory") is view  # a cached view is ready, not decoded into a second copy


def test_datasets_without_files_pass_through():
    from protokern.data import SyntheticParts

    ds = SyntheticParts(num_classes=2, images_per_class=2, image_size=16)
    assert prepare_images(ds, "memory", skip_bad_images=True) is ds


@pytest.mark.gpu
def test_gpu_cache_and_pinned_batches(cub):
    device = torch.device("cuda")
    for mode in ("gpu", "memory"):
        view = prepare_images(cub, mode, device=device, progress=False)
        assert view.device.type == ("cuda" if mode == "gpu" else "cpu")
        check_same(view, cub)  # items stay on the CPU
        sampler = DistributedSampler(view, 1, 0, shuffle=True, seed=1)
        got = list(CachedBatches(view, sampler, 4, device))
        want = list(DataLoader(cub, batch_size=4, sampler=DistributedSampler(cub, 1, 0, shuffle=True, seed=1)))
        for (x, y), (rx, ry) in zip(got, want):
            assert x.device.type == "cuda" and torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry)


@pytest.mark.parametrize("tty, progress, shown", [(True, True, True), (False, True, False), (True, False, False)])
def test_progress_bar_only_on_a_tty(cub, monkeypatch, tty, progress, shown):
    import io
    import sys

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    err = Stream()
    monkeypatch.setattr(sys, "stderr", err)
    prepare_images(cub, "memory", progress=progress, desc="decoding cub train")
    assert ("decoding cub train" in err.getvalue()) == shown


def test_streamed_view_pickles_for_worker_processes(cub):
    import pickle

    view = ImageView(cub, [2, 0], ["gone.jpg"])
    copy = pickle.loads(pickle.dumps(view))
    assert copy.skipped == ["gone.jpg"] and copy.targets == view.targets and copy.classes == cub.classes
    assert torch.equal(copy[0][0], cub[2][0])


def test_a_view_with_skipped_images_reads_its_own_rows():
    """A cached view whose dataset had images left out: item i is dataset row rows[i] in every read path (one
    item, a batch of items, a uint8 batch), and the skipped paths come back sorted, each once."""
    from protokern.data import skipped_images

    class Numbered(torch.utils.data.Dataset):
        targets = [0, 1, 0, 1, 0]

        def __len__(self):
            return 5

        def decode(self, index):
            return torch.full((3, 2, 2), index, dtype=torch.uint8)

    data = Numbered()
    cache = torch.stack([data.decode(i) for i in range(5)])  # indexed by dataset index
    view = ImageView(data, [0, 2, 3], ["z.jpg", "b.jpg"], images=cache)
    assert [int(view.decode(i)[0, 0, 0]) for i in range(3)] == [0, 2, 3] and view.targets == [0, 0, 1]
    items = view.__getitems__([1, 2])
    assert [round(float(x[0, 0, 0]) * 255) for x, _ in items] == [2, 3] and [y for _, y in items] == [0, 1]
    assert view.uint8_batch(torch.tensor([0, 2]))[:, 0, 0, 0].tolist() == [0, 3]
    other = ImageView(data, [1, 4], ["b.jpg", "a.jpg"])
    assert skipped_images(view, Subset(other, [0])) == ["a.jpg", "b.jpg", "z.jpg"]


class _WrongSize(torch.utils.data.Dataset):
    """Two 8 x 8 images, the second decoding to 8 x 7 (a dataset whose decode ignores its image_size)."""

    image_size = 8
    targets = [0, 1]

    def __len__(self):
        return 2

    def decode(self, index):
        return torch.zeros(3, 8, 7 if index == 1 else 8, dtype=torch.uint8)


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_an_item_decoding_to_another_size_is_one_line(cache):
    """Checked while decoding (cached, or uncached with skip_bad_images, which decodes every item once): one line
    naming the item (else a failure later, far from it)."""
    with pytest.raises(ValueError, match=r"item 1 decoded to \(3, 8, 7\), expected \(3, 8, 8\)"):
        prepare_images(_WrongSize(), cache, skip_bad_images=True, progress=False, workers=1)
