"""Pruning: the k-nearest-images search, the pruning rule on a constructed case, last-layer retraining."""

import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from protokern.data import imagenet_normalize
from protokern.losses import ProtoPNetLoss
from protokern.models import ProtoPNet
from protokern.prune import prune_prototypes, retrain_last_layer, select_records
from protokern.explain.local import explain_image, load_image_tensor
from protokern.push import PushRecords, nearest_training_patches, push_prototypes
from tests.explain.helpers import ListDataset, colour_model

# 20 uniform grey images, grey level i / 20; classes by index range. The trunk averages each 8x8 cell, so
# a prototype at grey level (c + 0.3) / 20 has as 6 nearest images c, c+1, c-1, c+2, c-2, c+3 (in that order,
# away from the ends of the range).
LABELS = [0] * 6 + [1] * 6 + [2] * 8
CENTRES = [1, 14, 5, 4, 16, 10]  # prototype j (class j // 2) sits next to image CENTRES[j]
# own-class images among the 6 nearest: p0 {0..5}: 6; p1 {12..17}: 0; p2 {3..8}: 3; p3 {2..7}: 2;
# p4 {14..19}: 6; p5 {8..13}: 2  ->  pruned with threshold 3: p1, p3, p5
EXPECTED_PRUNED = [1, 3, 5]


def grey_dataset():
    images = [torch.full((3, 8, 8), i / 20) for i in range(20)]
    return ListDataset(images, LABELS)


def grey_model():
    levels = [[(c + 0.3) / 20] * 3 for c in CENTRES]
    return colour_model(levels, [j // 2 for j in range(6)], num_classes=3)


def test_nearest_training_patches_on_constructed_features():
    model = grey_model()
    loader = DataLoader(grey_dataset(), batch_size=7, shuffle=False)  # 7 does not divide 20: running top-k
    nb = nearest_training_patches(model, loader, k=6, progress=False)
    assert nb.distance.shape == nb.image_index.shape == nb.label.shape == (6, 6)
    assert nb.patch.shape == (6, 6, 2) and nb.patch.eq(0).all()
    assert nb.image_size == (8, 8) and nb.feature_size == (1, 1)
    for j, c in enumerate(CENTRES):
        expected = sorted(range(20), key=lambda i: abs(i - c - 0.3))[:6]
        assert nb.image_index[j].tolist() == expected
        assert nb.label[j].tolist() == [LABELS[i] for i in expected]
    assert (nb.distance[:, 1:] >= nb.distance[:, :-1]).all()


def test_nearest_training_patches_match_brute_force():
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=3, prototype_dim=8).eval()
    images = torch.rand(17, 3, 32, 32)
    labels = torch.randint(0, 3, (17,))
    dataset = ListDataset(list(images), labels.tolist())
    subset = Subset(dataset, list(range(16, -1, -1)))  # reversed: indices map through the Subset
    nb = nearest_training_patches(model, DataLoader(subset, batch_size=5), k=4, progress=False)
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(images))
        d = (z[:, None] - model.prototype_layer.prototypes.view(1, 9, 8, 1, 1)).square().sum(2).flatten(2)
    best, patch = d.min(2)  # (N, P)
    ref_d, ref_i = best.t().sort(1)
    torch.testing.assert_close(nb.distance, ref_d[:, :4], rtol=1e-4, atol=1e-5)
    assert torch.equal(nb.image_index, ref_i[:, :4])
    assert torch.equal(nb.label, labels[ref_i[:, :4]])
    flat = patch.t().gather(1, ref_i[:, :4])
    assert torch.equal(nb.patch[..., 0] * z.shape[3] + nb.patch[..., 1], flat)


def test_prune_removes_the_expected_prototypes():
    model = grey_model()
    weight = model.last_layer.weight.detach().clone()
    prototypes = model.prototype_layer.prototypes.detach().clone()
    loader = DataLoader(grey_dataset(), batch_size=8, shuffle=False)
    result = prune_prototypes(model, loader, k=6, threshold=3, progress=False)
    assert result["pruned"] == EXPECTED_PRUNED and result["kept"] == [0, 2, 4]
    assert result["own_class_neighbours"] == [6, 0, 3, 2, 6, 2]
    assert result["pruned_per_class"] == [1, 1, 1] and result["remaining_per_class"] == [1, 1, 1]
    assert result["num_pruned"] == 3 and result["num_remaining"] == 3
    report = prune_prototypes(grey_model(), loader, k=6, threshold=1, progress=False, apply=False)
    assert report["pruned"] == [1] and report["pruned_per_class"] == [1, 0, 0]  # counts of each class's pruned
    assert report["remaining_per_class"] == [1, 2, 2]
    assert model.num_prototypes == 3 and model.prototype_classes.tolist() == [0, 1, 2]
    assert torch.equal(model.last_layer.weight, weight[:, [0, 2, 4]])
    assert torch.equal(model.prototype_layer.prototypes, prototypes[[0, 2, 4]])


def test_prune_threshold_and_dry_run():
    model = grey_model()
    loader = DataLoader(grey_dataset(), batch_size=20)
    dry = prune_prototypes(model, loader, k=6, threshold=4, progress=False, apply=False)
    assert dry["pruned"] == [1, 2, 3, 5] and model.num_prototypes == 6  # p2 has exactly 3 < 4
    assert prune_prototypes(model, loader, k=6, threshold=0, progress=False)["pruned"] == []
    with pytest.raises(ValueError, match="threshold"):
        prune_prototypes(model, loader, k=6, threshold=7, progress=False)
    with pytest.raises(ValueError, match="^k must be an integer >= 1, got 0"):
        prune_prototypes(model, loader, k=0, progress=False)
    with pytest.raises(ValueError, match="only 20 images"):
        prune_prototypes(model, loader, k=21, progress=False)
    with pytest.raises(ValueError, match="remove them all"):
        prune_prototypes(colour_model([[14.3 / 20] * 3] * 2, [0, 0], 3), loader, progress=False)
    with pytest.raises(ValueError, match="shuffle=False"):
        prune_prototypes(model, DataLoader(grey_dataset(), batch_size=4, shuffle=True), progress=False)


def test_prune_keeps_push_records_in_step():
    model = grey_model()
    loader = DataLoader(grey_dataset(), batch_size=8)
    records = push_prototypes(model, loader, progress=False)  # moves prototypes onto images, fine here
    model = grey_model()  # back to the constructed prototypes
    result = prune_prototypes(model, loader, k=6, threshold=3, progress=False, push_records=records)
    kept = result["push_records"]
    assert len(kept.image_index) == 3 and kept.image_dir == records.image_dir is None
    assert torch.equal(kept.image_index, records.image_index[[0, 2, 4]])
    assert torch.equal(kept.activation_map, records.activation_map[[0, 2, 4]])
    assert torch.equal(select_records(records, [5]).rf_box, records.rf_box[[5]])
    assert kept.pushed_as.tolist() == [0, 2, 4] and select_records(kept, [2, 0]).pushed_as.tolist() == [4, 0]


def test_pruned_records_find_the_push_pngs_of_their_prototypes(tmp_path):
    """After pruning, prototype j's push PNGs are those of its index at the push (pruned records had none: the
    explanations of a pruned model could not fall back on them when the push set is not at hand)."""
    model, data = grey_model(), grey_dataset()
    records = push_prototypes(model, DataLoader(data, batch_size=7), progress=False, save_dir=str(tmp_path))
    records.wait_images()
    kept = select_records(records, [1, 4])
    assert kept.png(1) == os.path.join(str(tmp_path), "4_source.png") and os.path.isfile(kept.png(0, "overlay"))
    restored = PushRecords.from_dict(kept.to_dict())
    assert restored.pushed_as.tolist() == [1, 4] and restored.png(1) == kept.png(1)
    old = records.to_dict()
    del old["pushed_as"]  # records saved before pushed_as: each prototype is its own
    assert PushRecords.from_dict(old).pushed_as.tolist() == list(range(6))
    model.prune_prototypes([0, 2, 3, 5])  # prototypes 1 and 4 remain, as 0 and 1
    explained = explain_image(model, data[4][0], push_records=kept, top_k=2)
    for e in explained.top:
        want = load_image_tensor(os.path.join(str(tmp_path), f"{[1, 4][e.prototype]}_source.png"))
        assert e.pushed_as == [1, 4][e.prototype] and torch.equal(e.source_image, want)


def test_retrain_last_layer_trains_only_the_last_layer():
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8)
    model.train()
    images = torch.rand(12, 3, 32, 32)
    images[6:, 0] = 1.0  # class 1: red channel saturated
    dataset = ListDataset(list(images), [0] * 6 + [1] * 6)
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = retrain_last_layer(model, loader, iters=30, lr=1e-2, progress=False)
    after = model.state_dict()
    for key, value in before.items():
        if key == "last_layer.weight":
            assert not torch.equal(value, after[key])
        else:
            assert torch.equal(value, after[key]), key  # BN statistics too: the frozen part runs in eval mode
    assert model.training and stats["iters"] == 30 and 0 <= stats["accuracy"] <= 1 and stats["loss"] > 0
    assert model.last_layer.weight.requires_grad
    model.last_layer.weight.requires_grad_(False)  # frozen before: frozen after, but retrained
    frozen = model.last_layer.weight.detach().clone()
    retrain_last_layer(model, loader, iters=1, lr=1e-2, progress=False)
    assert not model.last_layer.weight.requires_grad and not torch.equal(model.last_layer.weight, frozen)
    # the cached path reshuffles its batches every epoch, by seed
    runs = {}
    for seed in (0, 0, 1):
        again = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8)
        again.load_state_dict(before)
        retrain_last_layer(again, loader, iters=3, lr=1e-2, progress=False, seed=seed)
        runs.setdefault(seed, []).append(again.last_layer.weight.detach().clone())
    assert torch.equal(*runs[0]) and not torch.equal(runs[0][0], runs[1][0])

    class Identity(nn.Module):  # the augment path: a fresh forward every epoch
        def forward(self, x, generator=None):
            return x

    model2 = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8)
    model2.load_state_dict(before)
    stats2 = retrain_last_layer(model2, loader, iters=2, lr=1e-2, progress=False, augment=Identity())
    assert stats2["iters"] == 2 and not torch.equal(model2.last_layer.weight, before["last_layer.weight"])
    with pytest.raises(ValueError, match="iters"):
        retrain_last_layer(model, loader, iters=-1)
    with pytest.raises(ValueError, match="lr"):
        retrain_last_layer(model, loader, lr=0)


def test_retrain_fits_a_separable_task():
    """Two classes each marked by their own prototype: the last layer learns to separate them."""
    from tests.explain.helpers import BLUE, RED, canvas, paint

    model = colour_model([RED, BLUE], [0, 1], num_classes=2)
    with torch.no_grad():
        model.last_layer.weight.zero_()
    images = [paint(canvas(16), (0, 0), RED if i % 2 == 0 else BLUE) for i in range(8)]
    loader = DataLoader(ListDataset(images, [i % 2 for i in range(8)]), batch_size=4)
    stats = retrain_last_layer(model, loader, iters=40, lr=5e-2, progress=False)
    assert stats["accuracy"] == 1.0
    w = model.last_layer.weight
    assert w[0, 0] > 0 and w[1, 1] > 0


def test_retrain_in_train_mode_as_the_original():
    """train_mode=True (the original's retraining): BatchNorm statistics follow the batches, nothing else but the
    last layer changes; on_epoch sees every epoch (to test after each, as the original)."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8).eval()
    images = torch.rand(12, 3, 32, 32)
    loader = DataLoader(ListDataset(list(images), [0] * 6 + [1] * 6), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def on_epoch(epoch, stats):
        seen.append((epoch, model.training, sorted(stats)))
        model.eval()  # e.g. a test pass; the next epoch is back in train mode

    stats = retrain_last_layer(model, loader, iters=3, lr=1e-2, progress=False, train_mode=True, on_epoch=on_epoch)
    after = model.state_dict()
    assert seen == [(e, True, ["accuracy", "loss"]) for e in range(3)] and stats["iters"] == 3
    assert not model.training  # restored
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(before[k], after[k]) for k in statistics)
    assert all(torch.equal(before[k], after[k]) for k in before
               if k not in statistics and k != "last_layer.weight" and not k.endswith("num_batches_tracked"))
    assert not torch.equal(before["last_layer.weight"], after["last_layer.weight"])

    model.load_state_dict(before)  # the cached path keeps eval mode: statistics stay, on_epoch still called
    seen.clear()
    retrain_last_layer(model, loader, iters=2, lr=1e-2, progress=False, on_epoch=on_epoch)
    assert [e for e, _, _ in seen] == [0, 1] and not any(training for _, training, _ in seen)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in statistics)


@pytest.mark.parametrize("similarity", ["linear", "cosine"])
def test_nearest_training_windows_match_brute_force(similarity):
    """(2, 3) prototypes: the k nearest images by the layer's distance over every window (explicit loops),
    the window's top-left cell on the (Hout, Wout) grid, and the window recorded."""
    from tests.test_push import _window_reference

    torch.manual_seed(3)
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=3, prototype_dim=8, prototype_size=(2, 3),
                      similarity=similarity).eval()
    images = torch.rand(11, 3, 32, 32)
    labels = torch.randint(0, 3, (11,))
    nb = nearest_training_patches(model, DataLoader(ListDataset(list(images), labels.tolist()), batch_size=4),
                                  k=3, progress=False)
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(images))
    d = _window_reference(z, model.prototype_layer.prototypes.detach(), similarity).flatten(2)  # (N, P, 6)
    best, window = d.min(2)
    ref_d, ref_i = best.t().sort(1)
    assert nb.window == (2, 3) and nb.feature_size == (4, 4)
    torch.testing.assert_close(nb.distance.double(), ref_d[:, :3], rtol=1e-4, atol=1e-5)
    assert torch.equal(nb.image_index, ref_i[:, :3])
    assert torch.equal(nb.patch[..., 0] * 2 + nb.patch[..., 1], window.t().gather(1, ref_i[:, :3]))


def test_prune_keeps_window_and_similarity():
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8, prototype_size=(2, 2),
                      similarity="linear")
    model.prune_prototypes([1, 4])
    layer = model.prototype_layer
    assert layer.prototype_size == (2, 2) and layer.similarity == "linear" and model.num_prototypes == 4
    assert model.config["prototype_size"] == [2, 2] and model.config["similarity"] == "linear"
    rebuilt = ProtoPNet.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.prototype_layer.prototype_size == (2, 2) and rebuilt.prototype_layer.similarity == "linear"


def test_equal_distances_go_to_the_lowest_image_index_whatever_the_batch_size():
    """40 identical images, labels alternating: every image is at the same distance from each prototype. The
    neighbours are images 0..5 (as the original's heap keeps the earliest), so pruning does not depend on the
    batch size."""
    torch.manual_seed(0)
    model = ProtoPNet(nn.Identity(), num_classes=2, prototypes_per_class=1, prototype_dim=3, out_channels=3)
    model.add_on = nn.Identity()
    images = torch.rand(1, 3, 2, 2).expand(40, 3, 2, 2).clone()
    data = torch.utils.data.TensorDataset(images, torch.arange(40) % 2)
    for batch_size in (1, 3, 7, 40):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        neighbours = nearest_training_patches(model, loader, k=6, progress=False)
        assert neighbours.image_index.tolist() == [list(range(6))] * 2
        report = prune_prototypes(model, loader, k=6, threshold=3, progress=False, apply=False)
        assert report["own_class_neighbours"] == [3, 3] and report["pruned"] == []


def test_a_report_only_prune_reports_even_when_every_prototype_would_go():
    model = ProtoPNet(nn.Identity(), num_classes=2, prototypes_per_class=1, prototype_dim=3, out_channels=3)
    model.add_on = nn.Identity()
    data = torch.utils.data.TensorDataset(torch.rand(1, 3, 2, 2).expand(8, 3, 2, 2).clone(), torch.arange(8) % 2)
    loader = DataLoader(data, batch_size=3, shuffle=False)
    report = prune_prototypes(model, loader, k=4, threshold=4, progress=False, apply=False)
    assert report["pruned"] == [0, 1] and report["num_remaining"] == 0 and model.num_prototypes == 2
    with pytest.raises(ValueError, match="would remove them all"):
        prune_prototypes(model, loader, k=4, threshold=4, progress=False)


def test_classes_left_without_prototypes_are_a_warning_and_in_the_report():
    """With threshold 4, class 1 loses both its prototypes (p2 has 3 own-class images, p3 2): the model then has
    no evidence of its own for it, so it is a warning naming it (by name when the dataset has ``classes``), not a
    log line; it says the model predicts it only through other classes' prototypes, unless none would be left."""
    model = grey_model()
    named = ListDataset([torch.full((3, 8, 8), i / 20) for i in range(20)], LABELS, classes=["ant", "bee", "cat"])
    with pytest.warns(UserWarning, match=r"would leave 1 of 3 classes without prototypes of their own: 1 \(bee\) "
                                         r"\(none of their prototypes has 4 images of its class among its 6 nearest\); "
                                         r"the model would predict them only through other classes' prototypes"):
        report = prune_prototypes(model, DataLoader(named, batch_size=20), k=6, threshold=4, progress=False,
                                  apply=False)
    assert report["classes_without_prototypes"] == [1] and report["remaining_per_class"] == [1, 0, 1]
    with pytest.warns(UserWarning, match=r"pruning \(k=6, threshold=4\) left 1 of 3 classes .*: 1 \(none of"):
        prune_prototypes(model, DataLoader(grey_dataset(), batch_size=20), k=6, threshold=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class keeps a prototype: no warning
        report = prune_prototypes(grey_model(), DataLoader(grey_dataset(), batch_size=20), k=6, threshold=3,
                                  progress=False)
    assert report["classes_without_prototypes"] == []
    with pytest.warns(UserWarning) as caught:  # every prototype would go: no other classes' prototypes either
        prune_prototypes(colour_model([[14.3 / 20] * 3] * 2, [0, 0], 3), DataLoader(grey_dataset(), batch_size=20),
                         progress=False, apply=False)
    assert [str(w.message).endswith("among its 6 nearest)") for w in caught] == [True], caught[0].message


def test_every_prototype_pruned_because_every_class_is_small_says_so():
    """Two images per class and threshold 3: no prototype can keep its place, however well trained; the error
    says the classes are too small instead of only asking whether the model was trained."""
    model = ProtoPNet(nn.Identity(), num_classes=2, prototypes_per_class=1, prototype_dim=3, out_channels=3)
    model.add_on = nn.Identity()
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 2, 2), torch.arange(4) % 2)
    data.targets = [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"would remove them all \(every class has fewer than 3 images here: too small "
                                         r"for threshold 3\)$"):
        prune_prototypes(model, DataLoader(data, batch_size=4), k=4, threshold=3, progress=False)
    del data.targets  # no class sizes known: both causes named
    with pytest.raises(ValueError, match=r"can keep none; else is the model trained and pushed\?\)$"):
        prune_prototypes(model, DataLoader(data, batch_size=4), k=4, threshold=3, progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("live", [False, True])
def test_retrain_and_prune_a_model_in_another_dtype(dtype, live):
    """A .double() / .half() model (here with a trunk without parameters: the images take the model's dtype
    from its first parameter) prunes and retrains its last layer, the float32 similarities cast to it."""
    model, data = grey_model().to(dtype), grey_dataset()
    loader = DataLoader(data, batch_size=7, shuffle=False)
    assert prune_prototypes(model, loader, k=6, threshold=3, progress=False)["pruned"] == EXPECTED_PRUNED
    stats = retrain_last_layer(model, loader, iters=2, progress=False, train_mode=live)
    assert model.last_layer.weight.dtype == dtype
    # (Adam on float16 weights may overflow: its eps 1e-8 is 0 in float16, as in any pure-float16 training)
    assert dtype == torch.float16 or math.isfinite(stats["loss"])


def test_select_records_takes_a_boolean_mask_like_prune_prototypes():
    model, data = grey_model(), grey_dataset()
    records = push_prototypes(model, DataLoader(data, batch_size=7), progress=False, save_images=False)
    drop = torch.tensor([False, True, False, True, False, False])
    by_mask = select_records(records, ~drop)
    by_index = select_records(records, [0, 2, 4, 5])
    assert torch.equal(by_mask.image_index, by_index.image_index) and len(by_mask.image_index) == 4
    assert torch.equal(by_mask.prototype_class, records.prototype_class[[0, 2, 4, 5]])
    assert len(select_records(records, []).image_index) == 0  # an empty list is no indices, not floats
    with pytest.raises(ValueError, match="one entry per prototype"):
        select_records(records, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="boolean mask"):
        select_records(records, torch.tensor([0.0, 2.0]))


def test_live_retraining_on_an_empty_loader_raises_like_the_cached_one():
    empty = DataLoader(ListDataset([], []), batch_size=4)
    for live in (False, True):
        with pytest.raises(ValueError, match="yielded no images"):
            retrain_last_layer(grey_model(), empty, iters=1, progress=False, train_mode=live)


def test_retrain_reports_the_mean_loss_per_image_not_the_sum():
    """One batch holding all 12 images: the epoch's loss is the ProtoPNet loss of that batch under the weights it
    started from (a mean over images), not the sum of per-image losses (12 times as large)."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8).eval()
    images = torch.rand(12, 3, 32, 32)
    labels = torch.tensor([0] * 6 + [1] * 6)
    loader = DataLoader(ListDataset(list(images), labels.tolist()), batch_size=12, shuffle=False)
    with torch.no_grad():
        logits, min_distances = model(imagenet_normalize(images))
        expected, _ = ProtoPNetLoss()(logits, min_distances, labels, model)
    stats = retrain_last_layer(model, loader, iters=1, lr=1e-3, progress=False)
    assert abs(stats["loss"] - float(expected)) < 1e-4 * max(1.0, abs(float(expected)))


def test_retrain_weights_each_batch_loss_by_its_images():
    """Batches of 8 and 4 images: the epoch's loss is (8 L1 + 4 L2) / 12, the mean per image, not the mean per
    batch (L1 + L2) / 2."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8).eval()
    images = torch.rand(12, 3, 32, 32)
    loader = DataLoader(ListDataset(list(images), [0] * 6 + [1] * 6), batch_size=8, shuffle=False)
    base, seen = ProtoPNetLoss(), []

    def loss_fn(logits, min_distances, labels, model):
        loss, parts = base(logits, min_distances, labels, model)
        seen.append((loss.item(), labels.shape[0]))
        return loss, parts

    stats = retrain_last_layer(model, loader, iters=1, lr=1e-3, progress=False, loss_fn=loss_fn)
    assert [n for _, n in seen] == [8, 4]
    assert stats["loss"] == pytest.approx(sum(v * n for v, n in seen) / 12, rel=1e-9)
    assert stats["loss"] != pytest.approx(sum(v for v, _ in seen) / 2, rel=1e-6)


def test_the_augmentation_generator_follows_the_seed():
    """Same seed: the same augmentation draws; another seed: other draws (the live path seeds its augmentation
    generator with seed)."""

    class RecordingAugment(nn.Module):
        """An identity augmentation that records one draw of the generator it is given per batch."""

        def __init__(self):
            super().__init__()
            self.draws = []

        def forward(self, x, generator=None):
            self.draws.append(float(torch.rand((), generator=generator, device=x.device)))
            return x

    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    loader = DataLoader(ListDataset(list(images), [0] * 4 + [1] * 4), batch_size=4, shuffle=False)
    draws = {}
    for run, seed in enumerate((0, 0, 5)):
        model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8)
        augment = RecordingAugment()
        retrain_last_layer(model, loader, iters=2, lr=1e-3, progress=False, augment=augment, seed=seed)
        draws[run] = augment.draws
    assert len(draws[0]) == 4 and draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_push_records_of_another_size_are_refused():
    """prune_prototypes(push_records=...) with records of fewer prototypes than the model is a ValueError naming
    both counts (not records silently selected with the model's indices), and the model is left unpruned."""
    model = grey_model()
    loader = DataLoader(grey_dataset(), batch_size=5)
    records = push_prototypes(grey_model(), loader, progress=False)
    short = select_records(records, [0, 1, 2, 3, 4])  # 5 rows, the model has 6 prototypes
    with pytest.raises(ValueError, match="push_records hold 5 prototypes, the model 6"):
        prune_prototypes(model, loader, push_records=short, progress=False)
    assert model.num_prototypes == 6
