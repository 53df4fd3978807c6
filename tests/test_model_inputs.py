"""A model's own input statistics (``ProtoPNet(input_mean=, input_std=)``, grayscale included): every part
that feeds the model images (the training loop, push, nearest patches, pruning, last-layer retraining, the
explanations and the metrics) normalises with them, not with ImageNet's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from protokern.data import IMAGENET_MEAN, IMAGENET_STD, model_input, model_stats, normalize
from protokern.explain import explain_image, load_image_tensor
from protokern.explain.metrics import part_correspondence, part_localisation
from protokern.losses import ProtoPNetLoss
from protokern.models import ProtoPNet
from protokern.prune import prune_prototypes, retrain_last_layer
from protokern.push import nearest_training_patches, push_prototypes
from protokern.train.loop import run_epoch

# (channels, mean, std): a grayscale trunk, and an RGB one taking images in [0, 1] as they are
SETUPS = [(1, (0.25,), (0.5,)), (3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))]
SIZE = 16


def _model(channels, mean, std, seen):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(channels, 6, 3, stride=2, padding=1), nn.Sigmoid())
    trunk.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return ProtoPNet(trunk, num_classes=2, prototypes_per_class=2, prototype_dim=4, out_channels=6,
                     input_mean=mean, input_std=std).eval()


def _data(channels, n=6):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, channels, SIZE, SIZE, generator=g), torch.arange(n) % 2)


def _fed(seen, mean, std):
    """The images the trunk was given, un-normalised with the model's statistics (B, C, S, S)."""
    channels = len(mean)
    x = torch.cat(seen)
    return x * torch.tensor(std).view(1, channels, 1, 1) + torch.tensor(mean).view(1, channels, 1, 1)


@pytest.mark.parametrize("channels, mean, std", SETUPS)
def test_every_part_feeds_the_model_its_own_normalisation(channels, mean, std, tmp_path):
    seen: list[torch.Tensor] = []
    model = _model(channels, mean, std, seen)
    data = _data(channels)
    images = data.tensors[0]
    loader = DataLoader(data, batch_size=4, shuffle=False)

    def check(what, expected=images):
        fed = _fed(seen, mean, std)
        assert fed.shape[1:] == expected.shape[1:], what
        # each pass over the loader gave the trunk exactly the loader's images, normalised the model's way
        assert fed.shape[0] % expected.shape[0] == 0, what
        for rep in fed.split(expected.shape[0]):
            torch.testing.assert_close(rep, expected, rtol=0, atol=1e-6, msg=what)
        seen.clear()

    records = push_prototypes(model, loader, save_dir=str(tmp_path / "push"), progress=False)
    records.wait_images()
    check("push")
    assert (tmp_path / "push" / "0_overlay.png").is_file()
    assert np.asarray(Image.open(tmp_path / "push" / "0_source.png")).shape == (SIZE, SIZE, 3)
    # the pushed prototypes are the features of the images as the model takes them
    with torch.no_grad():
        z = model.conv_features(normalize(images, mean, std))
    for j in range(model.num_prototypes):
        h, w = records.patch[j].tolist()
        torch.testing.assert_close(model.prototype_layer.prototypes[j, :, 0, 0], z[records.image_index[j], :, h, w])
    seen.clear()

    nearest_training_patches(model, loader, k=2, progress=False)
    check("nearest patches")
    prune_prototypes(model, loader, k=2, threshold=0, progress=False, apply=False)
    check("pruning")
    retrain_last_layer(model, loader, iters=1, progress=False)
    check("last-layer retraining")
    part_localisation(model, data, torch.tensor([[0, 0, SIZE, SIZE]] * len(data)), batch_size=4, progress=False)
    check("part localisation")
    with torch.no_grad():
        run_epoch(model, model, loader, ProtoPNetLoss(), torch.device("cpu"))
    check("training loop (evaluation)")

    explanation = explain_image(model, images[0], push_records=records, top_k=2)
    check("explanation", images[:1])
    assert explanation.image.shape == (channels, SIZE, SIZE)
    explanation.save(str(tmp_path / "explained"), min_side=16)
    saved = np.asarray(Image.open(tmp_path / "explained" / "image.png"))  # grayscale drawn as gray RGB
    drawn = (images[0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(saved, np.repeat(drawn, 3 // channels, axis=2))
    assert (tmp_path / "explained" / explanation.top[0].file).is_file()


def test_part_correspondence_takes_the_models_normalisation():
    seen: list[torch.Tensor] = []
    channels, mean, std = SETUPS[0]
    model = _model(channels, mean, std, seen)
    images = _data(channels, 4).tensors[0]

    class Parts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return images[i], i % 2

        def part_locations(self, i):
            return torch.tensor([[4.0, 4.0, 1.0], [12.0, 12.0, 1.0]])

    part_correspondence(model, Parts(), half_size=4, batch_size=4, progress=False)
    torch.testing.assert_close(_fed(seen, mean, std), images, rtol=0, atol=1e-6)


def test_a_grayscale_model_explains_files_and_pil_images_by_their_luma(tmp_path):
    seen: list[torch.Tensor] = []
    model = _model(1, (0.5,), (0.25,), seen)
    rgb = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    luma = torch.from_numpy(np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255)[None]
    for image in (str(path), Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255):
        explanation = explain_image(model, image, top_k=1)
        assert explanation.image.shape == (1, SIZE, SIZE)
        torch.testing.assert_close(explanation.image, luma, rtol=0, atol=1 / 255)  # PIL rounds to bytes
        torch.testing.assert_close(_fed(seen, (0.5,), (0.25,)), explanation.image[None], rtol=0, atol=1e-6)
        seen.clear()
    assert load_image_tensor(str(path)).shape == (3, SIZE, SIZE)  # RGB unless asked
    with pytest.raises(ValueError, match=r"expected a float image tensor \(1, H, W\)"):
        explain_image(model, torch.rand(2, SIZE, SIZE))
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_tensor(str(path), channels=2)


def test_input_statistics_are_checked_and_kept_in_the_config():
    trunk = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU())
    model = ProtoPNet(trunk, num_classes=2, prototypes_per_class=1, prototype_dim=4, out_channels=6,
                      input_mean=[0.5], input_std=[0.2])
    assert model.input_mean == (0.5,) and model.input_std == (0.2,)
    assert model.config["input_mean"] == [0.5] and model.config["input_std"] == [0.2]
    rebuilt = ProtoPNet.from_config(model.config, backbone=nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU()))
    assert model_stats(rebuilt) == ((0.5,), (0.2,))
    default = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=4)
    assert model_stats(default) == (IMAGENET_MEAN, IMAGENET_STD)
    old = default.config
    del old["input_mean"], old["input_std"]  # a checkpoint from before the statistics were kept
    assert model_stats(ProtoPNet.from_config(old)) == (IMAGENET_MEAN, IMAGENET_STD)
    assert model_stats(nn.Linear(2, 2)) == (IMAGENET_MEAN, IMAGENET_STD)  # a module without them: ImageNet's

    kwargs = dict(num_classes=2, prototypes_per_class=1, prototype_dim=4)
    for mean, std, message in [((0.5, 0.5), (0.2, 0.2), "1, grayscale, or 3"), ((0.5,), (0.2, 0.2), "one value"),
                               ((0.5,), (0.0,), "std > 0"), ((float("nan"),), (1.0,), "finite"),
                               ((0.5,), (-1.0,), "std > 0")]:
        with pytest.raises(ValueError, match=message):
            ProtoPNet(nn.Conv2d(1, 6, 3), out_channels=6, input_mean=mean, input_std=std, **kwargs)
    with pytest.raises(TypeError, match="sequences of numbers"):
        ProtoPNet(nn.Conv2d(1, 6, 3), out_channels=6, input_mean="grey", input_std=(1.0,), **kwargs)
    with pytest.raises(ValueError, match="takes RGB images"):
        ProtoPNet("tiny", input_mean=(0.5,), input_std=(0.2,), **kwargs)


def test_model_input_takes_rgb_by_its_luma_for_a_grayscale_model_and_refuses_other_channels():
    gray = ProtoPNet(nn.Conv2d(1, 6, 3), num_classes=2, prototypes_per_class=1, prototype_dim=4, out_channels=6,
                     input_mean=(0.5,), input_std=(0.2,))
    torch.testing.assert_close(model_input(gray, torch.ones(2, 1, 4, 4)), torch.full((2, 1, 4, 4), 2.5))
    rgb = torch.rand(2, 3, 4, 4)
    luma = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    torch.testing.assert_close(model_input(gray, rgb), (luma - 0.5) / 0.2)
    with pytest.raises(ValueError, match=r"^the model takes 1-channel images \(its input_mean and input_std.*got "
                                         r"images of shape \(2, 2, 4, 4\)$"):
        model_input(gray, torch.rand(2, 2, 4, 4))
    colour = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=4)
    with pytest.raises(ValueError, match=r"^the model takes 3-channel images .*one value each for a grayscale trunk"):
        push_prototypes(colour, [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))], progress=False)


def test_a_grayscale_model_is_pushed_on_rgb_images_by_their_luma():
    """The datasets give RGB: a grayscale model is pushed, pruned and scored on their luma."""
    seen: list[torch.Tensor] = []
    model = _model(1, (0.25,), (0.5,), seen)
    data = _data(3)
    push_prototypes(model, DataLoader(data, batch_size=4), progress=False)
    rgb = data.tensors[0]
    luma = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    torch.testing.assert_close(_fed(seen, (0.25,), (0.5,)), luma, rtol=0, atol=1e-6)


def test_the_statistics_are_read_only():
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=4, input_mean=(0.5, 0.5, 0.5),
                      input_std=(0.25, 0.25, 0.25))
    with pytest.raises(AttributeError):
        model.input_std = (0.0, 0.0, 0.0)
    assert model.input_std == (0.25, 0.25, 0.25) and model.config["input_std"] == [0.25, 0.25, 0.25]


def test_wrapped_models_keep_their_statistics():
    """DataParallel / DistributedDataParallel wrappers do not forward attributes: the statistics are read from
    the model inside (push took ImageNet's for a wrapped model)."""
    seen: list[torch.Tensor] = []
    channels, mean, std = SETUPS[1]
    model = _model(channels, mean, std, seen)
    wrapped = nn.DataParallel(model)
    assert model_stats(wrapped) == (mean, std)
    data = _data(channels)
    images = data.tensors[0]
    loader = DataLoader(data, batch_size=3, shuffle=False)
    for what, run in [("push", lambda: push_prototypes(wrapped, loader, progress=False)),
                      ("nearest patches", lambda: nearest_training_patches(wrapped, loader, k=1, progress=False)),
                      ("part localisation", lambda: part_localisation(
                          wrapped, data, torch.tensor([[0, 0, SIZE, SIZE]] * len(data)), progress=False)),
                      ("explanation", lambda: explain_image(wrapped, images[0], top_k=1))]:
        run()
        fed = _fed(seen, mean, std)
        torch.testing.assert_close(fed, images[:len(fed)], rtol=0, atol=1e-6, msg=what)
        seen.clear()
