"""run_epoch: the epoch's accuracy and loss terms are batch-weighted means over its images, augmentation only in
training and with the given generator (known answers with a scripted model and loss)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from protokern.losses import TERMS
from protokern.train.loop import run_epoch


class _Scripted(nn.Module):
    """Logits and per-image loss values read off the image: pixel [0, 0, 0] holds the image's id; the logits are
    a fixed (N, 2) table, so accuracy and argmax / argmin are known. Takes images as they are (identity input
    statistics)."""

    input_mean, input_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = logits
        self.weight = nn.Parameter(torch.zeros(1))  # (for an optimizer)

    def forward(self, x):
        ids = x[:, 0, 0, 0].round().long()
        logits = self.table[ids] + 0 * self.weight
        return logits, ids[:, None].float()  # min_distances carry the ids to the loss


class _PerImageLoss(nn.Module):
    """Every term is the batch mean of the images' ids (so the epoch mean is the mean id if batches are weighted
    by their size)."""

    def forward(self, logits, min_distances, labels, model):
        value = min_distances.mean()
        return value + 0 * logits.sum(), {t: float(value) for t in TERMS}


def _batches(ids, sizes, labels):
    images = torch.zeros(len(ids), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], torch.tensor(labels[start:start + size])))
        start += size
    return out


def test_accuracy_and_terms_are_means_over_images():
    # 4 images in batches of 3 and 1; ids 0..3; argmax picks class 1 for ids 0, 1, 2 and class 0 for id 3
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [5.0, 0.0]])
    model = _Scripted(logits)
    loader = _batches([0, 1, 2, 3], [3, 1], [1, 1, 0, 0])
    out = run_epoch(model, model, loader, _PerImageLoss(), torch.device("cpu"))
    assert out["images"] == 4
    assert out["accuracy"] == pytest.approx(3 / 4)  # ids 0, 1 (class 1) and 3 (class 0) right; argmin: 1 / 4
    for t in TERMS:  # mean id 1.5; the mean of the two batches' means would be (1 + 3) / 2 = 2
        assert out[t] == pytest.approx(1.5), t


def test_augmentation_only_in_training_with_the_given_generator():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    model = _Scripted(logits)
    calls = []

    class Recording(nn.Module):
        def forward(self, x, generator=None):
            calls.append(generator)
            return x

    generator = torch.Generator().manual_seed(0)
    loader = _batches([0, 1], [2], [1, 0])
    run_epoch(model, model, loader, _PerImageLoss(), torch.device("cpu"), augment=Recording(), generator=generator)
    assert calls == []  # evaluation: never augmented
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = run_epoch(model, model, loader, _PerImageLoss(), torch.device("cpu"), optimizer=optimizer,
                    augment=Recording(), generator=generator)
    assert calls == [generator] and out["skipped"] == 0 and out["accuracy"] == 1.0


class _WeightLoss(nn.Module):
    """Loss = the model's weight: its gradient is exactly 1 at every step."""

    def forward(self, logits, min_distances, labels, model):
        loss = model.weight.sum() + 0 * logits.sum()
        return loss, {t: float(loss) for t in TERMS}


def test_each_step_uses_only_its_own_batchs_gradient():
    """Three batches, SGD lr 0.1, gradient 1 per batch: the weight goes 0 -> -0.3 (gradients zeroed before each
    step); left to accumulate they would sum to steps of 1, 2, 3 (-0.6)."""
    model = _Scripted(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    loader = _batches([0, 1, 0], [1, 1, 1], [1, 0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = run_epoch(model, model, loader, _WeightLoss(), torch.device("cpu"), optimizer=optimizer)
    assert out["images"] == 3 and out["skipped"] == 0
    torch.testing.assert_close(model.weight.detach(), torch.tensor([-0.3]))


class _NanForId3(nn.Module):
    """The batch mean of the ids, NaN for a batch holding id 3."""

    def forward(self, logits, min_distances, labels, model):
        value = math.nan if bool((min_distances == 3).any()) else float(min_distances.mean())
        loss = model.weight.sum() * 0 + value + 0 * logits.sum()
        return loss, {t: value for t in TERMS}


def test_skip_with_zero_accuracy_is_not_all_batches_skipped():
    """--nan-policy skip: one batch skipped, the other trained with every prediction wrong (accuracy 0) is a
    normal epoch (skipped 1, accuracy 0), not the 'every batch had a non-finite loss' error; all skipped is."""
    model = _Scripted(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))  # always class 1
    loader = _batches([0, 1, 3], [2, 1], [0, 0, 0])  # labels 0: every prediction wrong
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = run_epoch(model, model, loader, _NanForId3(), torch.device("cpu"), optimizer=optimizer, nan_policy="skip")
    assert (out["skipped"], out["images"], out["accuracy"]) == (1, 2, 0.0)
    with pytest.raises(FloatingPointError, match="every one of the 1 batches"):
        run_epoch(model, model, _batches([3], [1], [0]), _NanForId3(), torch.device("cpu"), optimizer=optimizer,
                  nan_policy="skip")


def test_evaluation_counts_every_batch_even_with_a_non_finite_loss():
    """Evaluating (no optimizer) never stops or skips on a NaN loss, whatever nan_policy: every image is counted
    in accuracy and the loss terms come out NaN (the checkpoint selection then sees the bad model)."""
    model = _Scripted(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    loader = _batches([0, 1, 3], [2, 1], [1, 1, 0])
    for policy in ("stop", "skip"):
        out = run_epoch(model, model, loader, _NanForId3(), torch.device("cpu"), nan_policy=policy)
        assert out["images"] == 3 and out["accuracy"] == 1.0 and "skipped" not in out
        assert math.isnan(out["total"])
