import math
import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from protokern.models import BACKBONES, load_backbone_state, make_backbone
from protokern.models.backbones import WeightsUnavailableError, fetch_imagenet_weights


@pytest.mark.parametrize("name", BACKBONES)
def test_output_shape_and_channels_at_224(name):
    with torch.device("meta"):  # shapes only: no memory, no compute
        trunk, channels = make_backbone(name)
        out = trunk(torch.empty(2, 3, 224, 224))
    expected = (28, 28) if name == "tiny" else (7, 7)
    assert tuple(out.shape) == (2, channels, *expected)


@pytest.mark.parametrize("name, channels", [("vgg11", 512), ("resnet18", 512), ("densenet121", 1024), ("tiny", 64)])
def test_forward_on_cpu_at_64(name, channels):
    trunk, out_channels = make_backbone(name)
    out = trunk.eval()(torch.randn(2, 3, 64, 64))
    assert out_channels == channels
    assert out.shape == (2, channels, 8, 8) if name == "tiny" else out.shape == (2, channels, 2, 2)
    if name in ("densenet121", "tiny"):
        assert out.min() >= 0  # ends with a ReLU


def test_trunk_keys_follow_torchvision():
    vgg, _ = make_backbone("vgg11")
    resnet, _ = make_backbone("resnet18")
    dense, _ = make_backbone("densenet121")
    assert "0.weight" in vgg.state_dict() and "18.weight" in vgg.state_dict()
    full_keys = torchvision.models.resnet18().state_dict()
    assert set(resnet.state_dict()) == {k for k in full_keys if not k.startswith("fc.")}
    assert "conv0.weight" in dense.state_dict() and "norm5.weight" in dense.state_dict()
    assert isinstance(list(dense.children())[-1], nn.ReLU)
    assert isinstance(list(vgg.children())[-1], nn.MaxPool2d)


def _same_params(trunk, state):
    return all(torch.equal(trunk.state_dict()[k], v) for k, v in state.items())


def test_weights_path_full_torchvision_state_dict(tmp_path):
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    trunk, _ = make_backbone("resnet18", weights_path=tmp_path / "r18.pth")
    assert _same_params(trunk, {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})

    dense = torchvision.models.densenet121()
    state = {"features." + k: v for k, v in dense.features.state_dict().items()}
    state["classifier.weight"] = dense.classifier.weight.detach()
    # a pre-0.3 torchvision checkpoint spells denselayer keys 'norm.1' instead of 'norm1'
    state["features.denseblock1.denselayer1.norm.1.weight"] = state.pop("features.denseblock1.denselayer1.norm1.weight")
    torch.save(state, tmp_path / "d121.pth")
    trunk, _ = make_backbone("densenet121", weights_path=str(tmp_path / "d121.pth"))
    assert _same_params(trunk, dense.features.state_dict())


def test_weights_path_trunk_state_dict(tmp_path):
    source, _ = make_backbone("tiny")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    trunk, _ = make_backbone("tiny", weights_path=tmp_path / "tiny.pt")
    assert _same_params(trunk, source.state_dict())

    vgg, _ = make_backbone("vgg11")
    torch.save({"features." + k: v for k, v in vgg.state_dict().items()}, tmp_path / "vgg.pt")  # torchvision naming
    trunk, _ = make_backbone("vgg11", weights_path=tmp_path / "vgg.pt")
    assert _same_params(trunk, vgg.state_dict())


@pytest.mark.parametrize("name", ["vgg11_bn", "densenet121", "resnet18"])
def test_weights_without_batchnorm_counters_load(tmp_path, name):
    """torchvision's older ImageNet files (its DenseNets, VGG-BN) have no num_batches_tracked: they load, as
    in torchvision, the counters keeping the trunk's values."""
    source, _ = make_backbone(name)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(source.state_dict())
    torch.save(state, tmp_path / "w.pt")
    trunk, _ = make_backbone(name, weights_path=tmp_path / "w.pt")
    assert _same_params(trunk, source.state_dict())


def test_bad_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_backbone("tiny", weights_path=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        make_backbone("tiny", weights_path=tmp_path / "junk.pt")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="missing keys: layer1.2"):
        make_backbone("resnet34", weights_path=tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="unexpected keys"):
        make_backbone("tiny", weights_path=tmp_path / "r18.pth")
    tiny, _ = make_backbone("tiny")
    state = tiny.state_dict()
    state["0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="shape mismatch for 0.weight"):
        make_backbone("tiny", weights_path=tmp_path / "shape.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        make_backbone("tiny", weights_path=tmp_path / "list.pt")
    with pytest.raises(ValueError):
        load_backbone_state(tiny, "tiny", {"0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="'0.bias' is a int"):
        load_backbone_state(tiny, "tiny", dict(tiny.state_dict(), **{"0.bias": 3}))


def test_pretrained_loads_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    url = torchvision.models.get_model_weights("vgg11")["IMAGENET1K_V1"].url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    vgg, _ = make_backbone("vgg11")
    torch.save({"features." + k: v for k, v in vgg.state_dict().items()}, cache / os.path.basename(url))
    trunk, _ = make_backbone("vgg11", pretrained=True)
    assert _same_params(trunk, vgg.state_dict())


def test_first_download_is_read_once(tmp_path, monkeypatch):
    """The trainer's early fetch downloads the weights without deserialising them; the model reads them once (a
    VGG-19 file is 550 MB); a damaged cached file is one line saying to delete it."""
    url = torchvision.models.get_model_weights("vgg11")["IMAGENET1K_V1"].url
    vgg, _ = make_backbone("vgg11")
    downloads, loads = [], []

    def download(source, dst, hash_prefix=None, progress=True):
        downloads.append((source, hash_prefix))
        torch.save({"features." + k: v for k, v in vgg.state_dict().items()}, dst)

    real_load = torch.load
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs))
    path = fetch_imagenet_weights("vgg11")
    assert path == str(tmp_path / "hub" / "checkpoints" / os.path.basename(url)) and os.path.isfile(path)
    assert downloads == [(url, "8a719046")] and loads == []
    trunk, _ = make_backbone("vgg11", pretrained=True)
    assert _same_params(trunk, vgg.state_dict())
    assert len(downloads) == 1 and loads == [path]
    assert fetch_imagenet_weights("tiny") is None

    with open(path, "wb") as fh:
        fh.write(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=r"^the cached ImageNet weights for vgg11, .* cannot be read "
                                                        r"\(UnpicklingError: .*delete the file to download it again$"):
        make_backbone("vgg11", pretrained=True)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_pretrained_unavailable_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)  # no network access in tests
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache, not the user's
    with pytest.raises(WeightsUnavailableError) as caught:
        make_backbone("resnet18", pretrained=True)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, RuntimeError)  # RuntimeError as before
    message = str(caught.value)
    assert "\n" not in message and message.startswith("no ImageNet weights for resnet18 here (offline?)")
    for advice in ("weights_path=", "backbone_weights=", "--no-pretrained --backbone-weights FILE",
                   "pretrained=False", "URLError: <urlopen error no network>"):
        assert advice in message


def test_pretrained_unavailable_is_one_line_from_the_trainer(tmp_path, monkeypatch, capsys):
    """python -m protokern.train: exit 2 with one line on stderr, no traceback, no run directory."""
    import socket
    import sys

    from protokern.train import main

    timeouts = []

    def offline(*args, **kwargs):  # (and the wait a stalled connection would get)
        timeouts.append(socket.getdefaulttimeout())
        _offline()

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the weights were found missing (32 s at CUB's size)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(sys.modules["protokern.train.main"], "build_splits", no_data)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as caught:
        main(["--backbone", "vgg11", "--pretrained", "--image-size", "32", "--synthetic-classes", "2",
              "--synthetic-train-per-class", "2", "--synthetic-test-per-class", "1", "--val-fraction", "0",
              "--device", "cpu", "--num-workers", "0", "--quiet", "--out", str(out)])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m protokern.train: error: no ImageNet weights for vgg11") and "\n" not in err
    assert not out.exists()
    assert timeouts == [60] and socket.getdefaulttimeout() is None  # torch.hub's urlopen had no timeout: a hang


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'vgg20'"):
        make_backbone("vgg20")
    with pytest.raises(ValueError, match="not both"):
        make_backbone("vgg11", pretrained=True, weights_path="x.pt")
    with pytest.raises(ValueError, match="no pretrained"):
        make_backbone("tiny", pretrained=True)


@pytest.mark.parametrize("name", ["tiny", "vgg11"])
def test_conv_weights_are_kaiming_normal_fan_out(name):
    """Each conv's weights have std sqrt(2 / (out_channels * kh * kw)) (torchvision's VGG init, mode fan_out),
    not sqrt(2 / fan_in): the first tiny conv would start ~3x too large."""
    torch.manual_seed(0)
    trunk, _ = make_backbone(name)
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs[:3]:
        out_channels, _, kh, kw = conv.weight.shape
        expected = math.sqrt(2.0 / (out_channels * kh * kw))
        assert float(conv.weight.std()) == pytest.approx(expected, rel=0.1), conv


def test_weights_saved_from_a_dataparallel_model_load(tmp_path):
    """torch.save(nn.DataParallel(trunk).state_dict()) spells every key 'module.<key>' (also inside a
    {'state_dict': ...} wrapper): the prefix is dropped and the trunk gets exactly those weights."""
    torch.manual_seed(0)
    source, _ = make_backbone("tiny")
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "dp.pt")
    trunk, _ = make_backbone("tiny", weights_path=tmp_path / "dp.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


def test_weights_inside_a_model_state_dict_wrapper_load(tmp_path):
    """The common torch training-checkpoint layout {'epoch': ..., 'model_state_dict': state} loads as the state."""
    torch.manual_seed(0)
    source, _ = make_backbone("tiny")
    torch.save({"epoch": 3, "model_state_dict": source.state_dict()}, tmp_path / "ckpt.pt")
    trunk, _ = make_backbone("tiny", weights_path=tmp_path / "ckpt.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


def test_batchnorm_counters_present_in_the_file_are_kept(tmp_path):
    """Only *missing* num_batches_tracked keys keep the trunk's values; counters the file has are loaded like
    every other buffer (the trunk's state then equals the file's)."""
    source, _ = make_backbone("tiny")
    state = source.state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters
    for i, key in enumerate(counters):
        state[key] = torch.tensor(100 + i)
    torch.save(state, tmp_path / "trunk.pt")
    trunk, _ = make_backbone("tiny", weights_path=tmp_path / "trunk.pt")
    assert [int(trunk.state_dict()[k]) for k in counters] == [100 + i for i in range(len(counters))]
