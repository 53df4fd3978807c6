"""Push (prototype projection): correctness against a brute-force reference, records, images, DDP merge."""

from __future__ import annotations

import math
import os
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, Subset,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)

from protokern import nearest_patches, prototype_distances
from protokern.data import imagenet_normalize
from protokern.models import ProtoPNet, patch_box
from protokern.imaging import upsample
from protokern.push import PushRecords, activation_boxes, nearest_training_patches, push_prototypes
from tests.explain.helpers import GREEN, RED, ListDataset, canvas, colour_model, paint

NUM_CLASSES, PER_CLASS, SIZE = 3, 2, 32


def _model(seed: int = 0) -> ProtoPNet:
    torch.manual_seed(seed)
    model = ProtoPNet("tiny", num_classes=NUM_CLASSES, prototypes_per_class=PER_CLASS, prototype_dim=8)
    with torch.no_grad():  # prototypes near the sigmoid features' range so winners are not all ties
        model.prototype_layer.prototypes.uniform_(0.3, 0.7)
    return model


def _dataset(n: int = 14, seed: int = 1, classes=None) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(n) % NUM_CLASSES if classes is None else torch.tensor(classes)
    return TensorDataset(images, labels)


def _loader(dataset, batch_size=5):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _reference(model: ProtoPNet, dataset):
    """Brute force: full distance maps, own-class masking, argmin over (image, patch), lowest index first."""
    model.eval()
    images, labels = dataset.tensors
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(images))
        d = prototype_distances(z, model.prototype_layer.prototypes)  # (N, P, H, W)
    N, P, H, W = d.shape
    own = labels[:, None] == model.prototype_classes[None, :]
    d = torch.where(own[..., None, None], d, torch.inf).permute(1, 0, 2, 3).reshape(P, -1)
    best, flat = d.min(1)  # first minimum: lowest image index, then lowest patch
    return best, flat // (H * W), flat % (H * W), z


def test_push_matches_brute_force_reference():
    model, data = _model(), _dataset()
    best, image, patch, z = _reference(model, data)
    records = push_prototypes(model, _loader(data), progress=False)

    assert torch.equal(records.image_index, image)
    assert torch.equal(records.patch[:, 0] * z.shape[3] + records.patch[:, 1], patch)
    torch.testing.assert_close(records.min_distance, best, rtol=1e-5, atol=1e-5)
    labels = data.tensors[1]
    assert torch.equal(labels[records.image_index], model.prototype_classes)
    # each prototype is now exactly the feature vector of its source patch ...
    protos = model.prototype_layer.prototypes.detach().flatten(1)
    source = z.flatten(2)[image, :, patch]
    assert torch.equal(protos, source)
    # ... so its min distance on its source image is ~0, at that patch (checked with the op)
    with torch.no_grad():
        zi = model.conv_features(imagenet_normalize(data.tensors[0][image]))
    dist, where = nearest_patches(zi, protos)
    assert dist.diagonal().abs().max() < 1e-5
    assert torch.equal(where.diagonal(), patch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_dtype_pushes_and_explains_in_its_own(dtype):
    """A .double() / .half() model takes the float32 images of the loaders (conv_features casts them outside
    autocast; the last layer gets the layer's float32 similarity in its own dtype), and push projects onto its
    own features: a float64 prototype is its float64 source window, not a float32 rounding of it."""
    from protokern.explain import explain_image
    from protokern.push import nearest_training_patches

    model, data = _model().to(dtype).eval(), _dataset()
    images = data.tensors[0]
    missing = TensorDataset(images[:6], torch.tensor([0, 1, 0, 1, 0, 1]))  # no image of class 2
    before = model.prototype_layer.prototypes.detach().clone()
    with pytest.warns(UserWarning, match="no images of classes"):
        push_prototypes(model, _loader(missing), progress=False, save_images=False)
    unpushed = model.prototype_classes == 2
    assert torch.equal(model.prototype_layer.prototypes.detach()[unpushed], before[unpushed])  # not rounded
    records = push_prototypes(model, _loader(data), progress=False)
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(images))
        logits, min_distances = model(imagenet_normalize(images))
    assert z.dtype == dtype and logits.dtype == dtype
    protos = model.prototype_layer.prototypes.detach()
    assert protos.dtype == dtype
    index = records.patch[:, 0] * z.shape[3] + records.patch[:, 1]
    source = model.prototype_layer.windows(z[records.image_index], index)
    assert torch.equal(protos, source)
    assert min_distances[records.image_index, torch.arange(len(protos))].eq(0).all()
    assert nearest_training_patches(model, _loader(data), k=2, progress=False).image_index.shape == (len(protos), 2)
    explanation = explain_image(model, images[0], push_records=records)
    assert explanation.logits.dtype == dtype and int(explanation.logits.argmax()) == int(logits[0].argmax())

def test_records_boxes_and_round_trip(tmp_path):
    model, data = _model(), _dataset()
    records = push_prototypes(model, _loader(data), progress=False, save_dir=str(tmp_path), save_images=False)
    H, W = records.feature_size
    assert records.image_size == (SIZE, SIZE) and (H, W) == (4, 4)
    for j in range(model.num_prototypes):
        h, w = records.patch[j].tolist()
        assert tuple(records.rf_box[j].tolist()) == patch_box(model.receptive_field, SIZE, h, w)
        y0, y1, x0, x1 = records.activation_box[j].tolist()
        assert 0 <= y0 < y1 <= SIZE and 0 <= x0 < x1 <= SIZE
        # the self-activation map peaks (log(1/eps)) at the source patch
        assert records.activation_map[j].argmax().item() == h * W + w
    assert records.activation_map.max() == pytest.approx(torch.log(torch.tensor(1 / 1e-4)).item(), rel=1e-4)
    boxes = records.original_boxes("rf")
    assert boxes.shape == (model.num_prototypes, 6) and (boxes[:, 5] == model.prototype_classes.numpy()).all()

    loaded = PushRecords.load(os.path.join(tmp_path, "push_records.pt"))
    for name in ("image_index", "patch", "min_distance", "rf_box", "activation_box", "activation_map"):
        assert torch.equal(getattr(loaded, name), getattr(records, name))
    assert not any(p.endswith(".png") for p in os.listdir(tmp_path))


def test_records_are_written_atomically(tmp_path, monkeypatch):
    """A save stopped halfway (disk full, a kill) leaves the previous push_records.pt whole: it was a plain
    torch.save into the file, which a truncation left unreadable."""
    model, data = _model(), _dataset()
    records = push_prototypes(model, _loader(data), progress=False, save_dir=str(tmp_path), save_images=False)
    path = tmp_path / "push_records.pt"
    before = path.read_bytes()

    def full(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError):
        records.save(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["push_records.pt"]
    assert torch.equal(PushRecords.load(str(path)).patch, records.patch)
    records.image_dir = tmp_path  # a Path, not a str: refused at save (weights_only loading would refuse it)
    with pytest.raises(TypeError, match="image_dir"):
        records.save(str(path))


def test_wrapped_and_parametrized_models(tmp_path):
    """A DataParallel-wrapped model is pushed, pruned and explained as the model inside (an AttributeError
    before); parametrized prototypes are refused (push wrote into a recomputed copy: nothing changed, records
    said pushed); records copy and pickle while their PNGs are written (an RLock error before)."""
    import copy
    import pickle

    from torch.nn.utils import parametrize

    from protokern.explain import explain_image
    from protokern.prune import prune_prototypes

    model, data = _model(), _dataset()
    wrapped = torch.nn.DataParallel(model)
    records = push_prototypes(wrapped, _loader(data), progress=False, save_dir=str(tmp_path))
    copied = copy.deepcopy(records)
    assert torch.equal(pickle.loads(pickle.dumps(records)).patch, records.patch) and not copied.images_pending
    records.wait_images()
    distance, _ = model.eval().prototype_layer.nearest(model.conv_features(imagenet_normalize(
        torch.stack([data[int(i)][0] for i in records.image_index]))))
    assert torch.equal(distance[torch.arange(6), torch.arange(6)], torch.zeros(6))  # each on its source: pushed
    assert explain_image(wrapped, data[0][0], push_records=records).logits.shape == (NUM_CLASSES,)
    prune_prototypes(wrapped, _loader(data), k=2, threshold=0, progress=False)

    class NonNegative(torch.nn.Module):
        def forward(self, x):
            return x.abs()

    model = _model()
    parametrize.register_parametrization(model.prototype_layer, "prototypes", NonNegative())
    with pytest.raises(ValueError, match="parametrization"):
        push_prototypes(model, _loader(data), progress=False)
    with pytest.raises(ValueError, match="parametrization"):
        model.prune_prototypes([0])
    model = _model()
    parametrize.register_parametrization(model.last_layer, "weight", NonNegative())  # pruning dropped it
    with pytest.raises(ValueError, match="new last layer, without the parametrization"):
        model.prune_prototypes([0])
    passes = []
    import protokern.prune
    real = protokern.prune.nearest_training_patches
    protokern.prune.nearest_training_patches = lambda *a, **k: passes.append(1) or real(*a, **k)
    try:
        with pytest.raises(ValueError, match="parametrization"):  # before the pass over the data
            prune_prototypes(model, _loader(data), k=2, threshold=0, progress=False)
        prune_prototypes(model, _loader(data), k=2, threshold=0, progress=False, apply=False)  # a report: taken
    finally:
        protokern.prune.nearest_training_patches = real
    assert passes == [1]


def test_pruning_refuses_a_ddp_wrapper():
    """Pruning and last-layer retraining are not shard-aware and pruning replaces the layers a DDP wrapper holds:
    they refuse the wrapper in one line (unwrapped, processes on their shards drifted apart and gloo aborted)."""
    from protokern.prune import prune_prototypes, retrain_last_layer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(_model())
        for call in (lambda: prune_prototypes(wrapped, _loader(_dataset()), k=2, progress=False),
                     lambda: retrain_last_layer(wrapped, _loader(_dataset()), iters=1, progress=False)):
            with pytest.raises(TypeError, match=r"give the model inside DistributedDataParallel \(\.module\)"):
                call()
        assert push_prototypes(wrapped, _loader(_dataset()), progress=False).patch.shape == (6, 2)  # push merges
    finally:
        dist.destroy_process_group()


def test_activation_boxes_percentile():
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 5.0
    box = activation_boxes(maps, (32, 32))[0].tolist()
    y0, y1, x0, x1 = box
    assert y0 < 12 < y1 and x0 < 20 < x1  # around the peak's pixel centre (row 1.5*8, col 2.5*8)
    assert (y1 - y0) * (x1 - x0) < 32 * 32 * 0.2
    plateau = torch.zeros(1, 10, 10)  # the 95th percentile is the maximum: the box is the plateau's
    plateau[0, 2:6, 3:7] = 1.0
    assert activation_boxes(plateau, (10, 10)).tolist() == [[2, 6, 3, 7]]


@pytest.mark.parametrize("kh, kw", [(2, 3), (3, 3), (4, 2), (5, 5)])
def test_window_maps_peak_at_their_windows_centre(kh, kw):
    """A map over the positions of kh x kw windows on an 8 x 8 feature map (8-pixel cells) with one peak: the
    upsampled map's maximum and the most activated box's centre lie at the window's centre (pixel
    ((h + kh / 2) 8, (w + kw / 2) 8)), without a bias to any side. Stretched over the image, the map of positions
    put them up to half a window away; max-pooled onto the cells, a k x k plateau whose first maximum was
    its top-left."""
    hout, wout = 9 - kh, 9 - kw
    for h, w in [(1, 1), (hout - 2, wout - 2), (hout // 2, wout // 2)]:
        maps = torch.zeros(1, hout, wout)
        maps[0, h, w] = 5.0
        cy, cx = (h + kh / 2) * 8, (w + kw / 2) * 8
        up = upsample(maps[0], (64, 64), (kh, kw))
        py, px = divmod(int(up.argmax()), 64)
        assert abs(py + 0.5 - cy) <= 1 and abs(px + 0.5 - cx) <= 1, ((py, px), (cy, cx))
        y0, y1, x0, x1 = activation_boxes(maps, (64, 64), window=(kh, kw))[0].tolist()
        assert abs((y0 + y1) / 2 - cy) <= 1.5 and abs((x0 + x1) / 2 - cx) <= 1.5, ((y0, y1, x0, x1), (cy, cx))
    one = torch.rand(3, 7, 5)  # 1 x 1 prototypes: the original's stretched map, unchanged
    assert torch.equal(upsample(one, (40, 30)), F.interpolate(one[:, None], size=(40, 30), mode="bicubic",
                                                                align_corners=False)[:, 0])


@pytest.mark.parametrize("shape, image_size", [((1, 1), (7, 7)), ((1, 1), (64, 96)), ((3, 5), (40, 30))])
def test_a_constant_map_boxes_the_whole_image(shape, image_size):
    maps = torch.full((2, *shape), 0.37)
    assert activation_boxes(maps, image_size).tolist() == [[0, image_size[0], 0, image_size[1]]] * 2


def test_batch_size_does_not_change_the_result():
    data = _dataset()
    a, b = _model(), _model()
    ra = push_prototypes(a, _loader(data, 1), progress=False)
    rb = push_prototypes(b, _loader(data, 14), progress=False)
    assert torch.equal(ra.image_index, rb.image_index) and torch.equal(ra.patch, rb.patch)
    # conv numerics may differ in the last bits between batch sizes
    torch.testing.assert_close(a.prototype_layer.prototypes, b.prototype_layer.prototypes)


def test_ties_go_to_the_lowest_image_index():
    image = torch.rand(1, 3, SIZE, SIZE)
    data = TensorDataset(image.repeat(6, 1, 1, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    records = push_prototypes(_model(), DataLoader(data, batch_size=2), progress=False)
    assert records.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    # ties within a batch, and over a loader whose order is not the dataset's
    data = TensorDataset(image.repeat(6, 1, 1, 1), torch.tensor([0, 0, 1, 1, 2, 2]))
    for batch in (3, 6):
        records = push_prototypes(_model(), DataLoader(data, batch_size=batch), progress=False)
        assert records.image_index.tolist() == [0, 0, 2, 2, 4, 4], batch
    reverse = Subset(data, [5, 4, 3, 2, 1, 0])
    for batch in (1, 6):  # (equal batch sizes: a conv's bits can depend on the batch size, which would untie)
        records = push_prototypes(_model(), DataLoader(reverse, batch_size=batch), progress=False)
        assert records.image_index.tolist() == [0, 0, 2, 2, 4, 4], batch
        near = nearest_training_patches(_model(), DataLoader(reverse, batch_size=batch), k=2, progress=False)
        assert near.image_index.tolist() == [[0, 1]] * 6, batch


def test_nan_features_are_never_pushed_onto():
    """An image whose features are NaN (a NaN pixel) is passed over with a warning, also when it shares a batch
    with its class's only good image; the nearest-patch search puts it last, at distance inf."""
    data = _dataset(n=6)
    images, labels = data.tensors
    images[0, :, 3, 3] = math.nan  # class 0; image 3 is the other one of class 0
    for batch in (2, 6):
        with pytest.warns(UserWarning, match=r"push: \d+ NaN distances ignored"):
            records = push_prototypes(_model(), DataLoader(TensorDataset(images, labels), batch_size=batch),
                                      progress=False)
        assert records.image_index[:2].tolist() == [3, 3] and torch.isfinite(records.min_distance).all()
    near = nearest_training_patches(_model(), DataLoader(TensorDataset(images, labels), batch_size=4), k=6,
                                    progress=False)
    assert (near.image_index[:, -1] == 0).all() and torch.isinf(near.distance[:, -1]).all()
    assert torch.isfinite(near.distance[:, :-1]).all()


def test_missing_class_keeps_prototypes_and_warns():
    model, data = _model(), _dataset(classes=[0, 1] * 5, n=10)
    before = model.prototype_layer.prototypes.detach().clone()
    with pytest.warns(UserWarning, match="no images of classes 2: "):
        records = push_prototypes(model, _loader(data), progress=False)
    missing = model.prototype_classes == 2
    assert torch.equal(model.prototype_layer.prototypes[missing], before[missing])
    assert (records.image_index[missing] == -1).all() and (records.rf_box[missing] == -1).all()
    assert (records.activation_box[missing] == -1).all() and (records.activation_box[~missing] >= 0).all()
    assert (records.patch[missing] == -1).all() and (records.patch[~missing] >= 0).all()
    assert torch.isinf(records.min_distance[missing]).all()
    assert not torch.equal(model.prototype_layer.prototypes[~missing], before[~missing])


def test_subset_loader_reports_dataset_indices():
    data = _dataset()
    subset = Subset(data, [13, 2, 7, 4, 9, 0, 11])
    records = push_prototypes(_model(), _loader(subset, 3), progress=False)
    assert set(records.image_index.tolist()) <= {13, 2, 7, 4, 9, 0, 11}
    assert torch.equal(data.tensors[1][records.image_index], _model().prototype_classes)


def test_plain_iterable_uses_positions():
    data = _dataset()
    batches = [(data.tensors[0][i:i + 4], data.tensors[1][i:i + 4]) for i in range(0, 14, 4)]
    a, b = _model(), _model()
    ra = push_prototypes(a, batches, progress=False)
    rb = push_prototypes(b, _loader(data), progress=False)
    assert torch.equal(ra.image_index, rb.image_index)


@pytest.mark.parametrize("sampler", ["shuffle", SubsetRandomSampler, WeightedRandomSampler, "custom random",
                                     "batch sampler", "shuffled batches", DistributedSampler])
def test_a_loader_in_random_order_is_rejected(sampler):
    data = _dataset()
    n = len(data)
    kwargs = ({"shuffle": True} if sampler == "shuffle"
              else {"batch_sampler": BatchSampler(RandomSampler(data), 4, False)} if sampler == "batch sampler"
              else {"batch_sampler": _ShuffledBatches(range(n), 2, False)} if sampler == "shuffled batches"
              else {"batch_size": 4, "sampler": (
                  SubsetRandomSampler(range(n)) if sampler is SubsetRandomSampler
                  else WeightedRandomSampler([1.0] * n, n) if sampler is WeightedRandomSampler
                  # its order changes with set_epoch (the same in two passes of one epoch)
                  else DistributedSampler(data, num_replicas=1, rank=0, shuffle=True) if sampler is DistributedSampler
                  else _RandomOrder(n))})
    with pytest.raises(ValueError, match="fixed order"):
        push_prototypes(_model(), DataLoader(data, **kwargs), progress=False)


class _LastBatchFirst(BatchSampler):
    def __iter__(self):
        batches = list(super().__iter__())
        return iter(batches[-1:] + batches[:-1])


class _ShuffledBatches(BatchSampler):
    def __iter__(self):
        batches = list(super().__iter__())
        return iter([batches[i] for i in torch.randperm(len(batches)).tolist()])


class _Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


class _RandomOrder(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n


def test_a_fixed_custom_order_is_followed():
    data = _dataset()
    order = list(range(len(data)))[::-1]
    plain = push_prototypes(_model(), _loader(data), progress=False)
    loaders = [DataLoader(data, batch_size=4, sampler=order),  # a list
               DataLoader(data, batch_size=4, sampler=_Reversed(len(data))),  # a Sampler, one order every pass
               DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 1, 0, shuffle=False)),  # in order
               DataLoader(data, batch_sampler=_LastBatchFirst(range(len(data)), 4, False))]  # reordered batches
    for loader in loaders:
        reverse = push_prototypes(_model(), loader, progress=False)
        # the same pushed prototypes, found in the same images named by their dataset index
        assert torch.equal(reverse.image_index, plain.image_index)
        assert torch.equal(reverse.patch, plain.patch) and torch.equal(reverse.min_distance, plain.min_distance)


def test_images_written_in_background(tmp_path):
    model, data = _model(), _dataset()
    records = push_prototypes(model, _loader(data), progress=False, save_dir=str(tmp_path))
    records.wait_images()
    files = set(os.listdir(tmp_path))
    for j in range(model.num_prototypes):
        for kind in ("source", "overlay", "rf", "act"):
            assert f"{j}_{kind}.png" in files
    from PIL import Image

    with Image.open(tmp_path / "0_source.png") as img:
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_saved_records_name_their_images_also_after_a_move(tmp_path):
    model, data = _model(), _dataset()
    records = push_prototypes(model, _loader(data), progress=False, save_dir=str(tmp_path / "push"))
    records.wait_images()
    loaded = PushRecords.load(str(tmp_path / "push" / "push_records.pt"))
    assert loaded.image_dir == records.image_dir == str(tmp_path / "push")
    shutil.copytree(tmp_path / "push", tmp_path / "copied")
    copied = PushRecords.load(str(tmp_path / "copied" / "push_records.pt"))
    assert copied.image_dir == str(tmp_path / "copied")  # its own images, not the original's
    os.rename(tmp_path / "push", tmp_path / "moved")
    moved = PushRecords.load(str(tmp_path / "moved" / "push_records.pt"))
    assert moved.image_dir == str(tmp_path / "moved") and os.path.isfile(os.path.join(moved.image_dir, "0_source.png"))


def test_train_mode_restored():
    model = _model().train()
    push_prototypes(model, _loader(_dataset()), progress=False)
    assert model.training


# ------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = _dataset()
        shard = Subset(data, range(rank, len(data), world))
        model = _model()
        records = push_prototypes(model, _loader(shard, 3), progress=False)
        # ties across ranks (one image everywhere, one batch of 3 a rank, as the reference's two batches: the same
        # bits everywhere): the lowest dataset index, whichever rank holds it
        tied = _tied_dataset()
        tied_records = push_prototypes(_model(), _loader(Subset(tied, range(rank, len(tied), world)), 3),
                                       progress=False)
        # a plain iterable of batches: image i of this rank's share is position * world + rank
        plain = [(data.tensors[0][i:i + 1], data.tensors[1][i:i + 1]) for i in range(rank, len(data), world)]
        plain_records = push_prototypes(_model(), plain, progress=False)
        torch.save({"records": records.to_dict(), "prototypes": model.prototype_layer.prototypes.detach(),
                    "tied": tied_records.image_index, "plain": plain_records.image_index},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _tied_dataset() -> TensorDataset:
    """One image six times; each class's lowest index on another rank of two: class 0 at 1, 1 at 0, 2 at 2."""
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    return TensorDataset(image.repeat(6, 1, 1, 1), torch.tensor([1, 0, 2, 1, 0, 2]))


def test_ddp_push_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, data = _model(), _dataset()
    records = push_prototypes(model, _loader(data), progress=False)
    tied = push_prototypes(_model(), _loader(_tied_dataset(), 3), progress=False).image_index
    assert tied.tolist() == [1, 1, 0, 0, 2, 2]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["records"]["image_index"], records.image_index)
        assert torch.equal(got["records"]["patch"], records.patch)
        torch.testing.assert_close(got["prototypes"], model.prototype_layer.prototypes.detach())
        assert torch.equal(got["tied"], tied) and torch.equal(got["plain"], records.image_index)


# ---------------------------------------------------------------------------------------------- k x k, kinds
def _window_reference(z: torch.Tensor, p: torch.Tensor, similarity: str) -> torch.Tensor:
    """(N, P, Hout, Wout) float64 distances of every prototype to every kh x kw window, by explicit loops
    over positions (the original's conv formulation for 'log' / 'linear'; 2 - 2 cos for 'cosine')."""
    z, p = z.double(), p.double()
    kh, kw = p.shape[2:]
    hout, wout = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    out = torch.empty(z.shape[0], p.shape[0], hout, wout, dtype=torch.float64)
    for h in range(hout):
        for w in range(wout):
            window = z[:, None, :, h:h + kh, w:w + kw]  # (N, 1, D, kh, kw)
            if similarity == "cosine":
                cos = (window * p).sum((2, 3, 4)) / (window.flatten(2).norm(dim=2) * p.flatten(1).norm(dim=1))
                out[:, :, h, w] = 2 - 2 * cos
            else:
                out[:, :, h, w] = (window - p).square().sum((2, 3, 4))
    return out


@pytest.mark.parametrize("similarity", ["log", "linear", "cosine"])
def test_push_of_window_prototypes_matches_brute_force(similarity, tmp_path):
    """(2, 3) prototypes (kh != kw) with every similarity: push picks the own-class window of the brute-force
    minimum, copies that window's features into the prototype, and records its top-left cell, its receptive
    field box (the original's prototype-layer box of the window) and a self-activation map over the window
    positions that peaks at the source window."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=NUM_CLASSES, prototypes_per_class=PER_CLASS, prototype_dim=8,
                      prototype_size=(2, 3), similarity=similarity)
    with torch.no_grad():
        model.prototype_layer.prototypes.uniform_(0.3, 0.7)
    data = _dataset()
    model.eval()
    images, labels = data.tensors
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(images))
    d = _window_reference(z, model.prototype_layer.prototypes.detach(), similarity)  # (N, P, 3, 2)
    N, P, hout, wout = d.shape
    assert (hout, wout) == (3, 2)
    own = labels[:, None] == model.prototype_classes[None, :]
    d = torch.where(own[..., None, None], d, torch.inf).permute(1, 0, 2, 3).reshape(P, -1)
    best, flat = d.min(1)
    image, window = flat // (hout * wout), flat % (hout * wout)

    records = push_prototypes(model, _loader(data), progress=False, save_dir=str(tmp_path), save_images=False)
    assert torch.equal(records.image_index, image)
    assert torch.equal(records.patch[:, 0] * wout + records.patch[:, 1], window)
    torch.testing.assert_close(records.min_distance.double(), best, rtol=1e-5, atol=1e-5)
    assert records.window == (2, 3) and records.activation_map.shape == (P, hout, wout)

    protos = model.prototype_layer.prototypes.detach()
    for j in range(P):
        h, w = records.patch[j].tolist()
        torch.testing.assert_close(protos[j], z[image[j], :, h:h + 2, w:w + 3], rtol=0, atol=1e-6)
        assert tuple(records.rf_box[j].tolist()) == patch_box(model.receptive_field, SIZE, h, w, window=(2, 3))
        assert records.activation_map[j].argmax().item() == h * wout + w
    peak = {"log": math.log(1 / 1e-4), "linear": 0.0, "cosine": 1.0}[similarity]
    torch.testing.assert_close(records.activation_map.amax((1, 2)), torch.full((P,), peak), rtol=1e-4, atol=1e-4)
    # after the push each prototype sits at distance ~0 from its source window
    with torch.no_grad():
        sim, dist = model.prototype_layer(z[image])
    assert dist.diagonal().abs().max() < 1e-5
    loaded = PushRecords.load(os.path.join(tmp_path, "push_records.pt"))
    assert loaded.window == (2, 3) and torch.equal(loaded.rf_box, records.rf_box)


def test_a_device_other_than_the_models_is_one_line_and_batches_may_carry_more_items():
    """device= names the model's device (the model is not moved): another one is a ValueError, not a device
    mismatch from inside; batches of (images, labels, index) are read like the other searches read them."""
    from protokern.explain import explain_image
    from protokern.prune import prune_prototypes
    from protokern.push import nearest_training_patches

    model, data = _model().eval(), _dataset()
    loader = _loader(data)
    for call in (lambda: push_prototypes(model, loader, device="meta", progress=False),
                 lambda: nearest_training_patches(model, loader, k=2, device="meta", progress=False),
                 lambda: prune_prototypes(model, loader, device="meta", progress=False),
                 lambda: explain_image(model, data.tensors[0][0], device="meta")):
        with pytest.raises(ValueError, match=r"^device='meta' but the model is on cpu: move the model there first"):
            call()
    from protokern.utils import model_device

    assert model_device(torch.nn.ReLU(), "meta") == torch.device("meta")  # nothing to move
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        model_device(model, "bogus")
    want = push_prototypes(_model().eval(), loader, progress=False, save_images=False)
    images, labels = data.tensors
    with_index = TensorDataset(images, labels, torch.arange(len(labels)))
    got = push_prototypes(model, _loader(with_index), device="cpu", progress=False, save_images=False)
    assert torch.equal(got.image_index, want.image_index) and torch.equal(got.patch, want.patch)


def test_explanations_take_the_push_set_as_a_subset():
    """Records hold indices of the dataset under a Subset: explain_image takes the Subset the loader was over."""
    from protokern.explain import explain_image

    model, data = _model().eval(), _dataset()
    subset = Subset(data, list(range(6, 14)))
    records = push_prototypes(model, _loader(subset), progress=False, save_images=False)
    assert records.image_index.min() >= 6
    explanation = explain_image(model, data.tensors[0][0], push_records=records, push_images=subset)
    for e in explanation.top:
        torch.testing.assert_close(e.source_image, data.tensors[0][e.source_index])


def test_the_searches_refuse_misread_batches_in_one_line():
    """uint8 images and labels outside the model's classes: one line from push, the nearest patches, pruning and
    last-layer retraining (image_batches checks them all), not a silently different search."""
    from protokern.prune import prune_prototypes, retrain_last_layer
    from protokern.push import nearest_training_patches

    model, data = _model().eval(), _dataset()
    images, labels = data.tensors
    as_bytes = [((images * 255).round().to(torch.uint8), labels)]
    relabelled = [(images, labels + model.num_classes)]
    for loader, error, message in ((as_bytes, TypeError, "uint8_to_float"), (relabelled, ValueError, "labels must be")):
        for call in (lambda: push_prototypes(model, loader, progress=False),
                     lambda: nearest_training_patches(model, loader, k=2, progress=False),
                     lambda: prune_prototypes(model, loader, k=2, threshold=1, progress=False),
                     lambda: retrain_last_layer(model, loader, iters=1, progress=False)):
            with pytest.raises(error, match=message):
                call()


def test_records_of_a_deleted_push_folder_point_at_their_own_folder(tmp_path):
    """find_images: the stored image_dir no longer exists and the records' new folder holds no PNGs (yet): the
    records point at their own folder (documented: 'or if the stored folder is gone'), not at the vanished one;
    a stored folder that still exists is kept."""
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    images = [paint(canvas(32), (1, 1), RED), paint(canvas(32), (2, 2), GREEN)]
    records = push_prototypes(model, DataLoader(ListDataset(images, [0, 1]), batch_size=2), progress=False)
    records.image_dir = str(tmp_path / "gone")
    new = tmp_path / "moved"
    records.save(str(new / "push_records.pt"))
    loaded = PushRecords.load(str(new / "push_records.pt"))
    assert loaded.image_dir == os.path.abspath(new)
    os.makedirs(tmp_path / "kept")
    os.makedirs(tmp_path / "empty")
    loaded.image_dir = str(tmp_path / "kept")
    loaded.find_images(str(tmp_path / "empty"))
    assert loaded.image_dir == str(tmp_path / "kept")


def test_pushed_patches_on_a_non_square_feature_map_are_h_w_of_the_source_cell():
    """64 x 48 images give an 8 x 6 feature map: the red prototype's source cell (5, 1) is patch (5, 1) and its
    receptive-field box covers that cell's pixels (patch index h * Wout + w split by Wout, not by Hout)."""
    images = []
    for cell, colour in (((5, 1), RED), ((2, 4), GREEN)):
        images.append(paint(canvas(64)[:, :, :48].contiguous(), cell, colour))
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    records = push_prototypes(model, DataLoader(ListDataset(images, [0, 1]), batch_size=2), progress=False)
    assert records.feature_size == (8, 6)
    assert records.patch.tolist() == [[5, 1], [2, 4]]
    assert records.rf_box[0].tolist() == [40, 48, 8, 16]
