"""Convolutional trunks (the ``features`` of a ProtoPNet) built from torchvision, plus a tiny CPU trunk.

Trunk layouts and their state-dict keys:

- VGG (``vgg11/13/16/19`` and ``_bn``): torchvision's ``vgg.features`` (keys ``N.*``), last max-pool kept,
  so a 224x224 input gives a 7x7 map; 512 channels.
- ResNet (``resnet18/34/50/101/152``): ``conv1, bn1, relu, maxpool, layer1..layer4`` under torchvision's
  names (keys as in torchvision's ResNet, without ``fc``); 512 or 2048 channels.
- DenseNet (``densenet121/161/169/201``): torchvision's ``densenet.features`` (ending with ``norm5``) followed
  by ``final_relu`` (as the original's ``densenet_features``); 1024 / 2208 / 1664 / 1920 channels.
- ``tiny``: three conv3x3-BN-ReLU-maxpool2 stages (32, 64, 64 channels): 64x64 -> 8x8, 64 channels.
"""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models import vgg as tv_vgg

from protokern.utils import first_line, listed

__all__ = ["BACKBONES", "WeightsUnavailableError", "fetch_imagenet_weights", "load_backbone_state", "make_backbone"]

DOWNLOAD_TIMEOUT_S = 60  # a stalled connection (a proxy, a firewall dropping packets) ends the download

_VGG_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
_VGGS = tuple(name + bn for name in _VGG_CONFIGS for bn in ("", "_bn"))
_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")
_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

BACKBONES: tuple[str, ...] = _VGGS + _RESNETS + _DENSENETS + ("tiny",)
"""Names accepted by :func:`make_backbone`."""


class WeightsUnavailableError(OSError, RuntimeError):
    """torchvision's ImageNet weights are neither in the torch hub cache nor downloadable (offline?), or the
    cached file cannot be read. An ``OSError``: the command-line tools report it in one line; a ``RuntimeError``
    as before."""


def _family(name: str) -> str:
    if name in _VGGS:
        return "vgg"
    if name in _RESNETS:
        return "resnet"
    if name in _DENSENETS:
        return "densenet"
    return "tiny"


def _init_conv_bn(module: nn.Module) -> None:
    """torchvision's VGG init: kaiming-normal (fan_out, relu) convs with zero bias, BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _tiny_trunk() -> tuple[nn.Module, int]:
    layers, in_channels = [], 3
    for channels in (32, 64, 64):
        layers += [
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        ]
        in_channels = channels
    trunk = nn.Sequential(*layers)
    _init_conv_bn(trunk)
    return trunk, in_channels


def _build(name: str) -> tuple[nn.Module, int]:
    family = _family(name)
    if family == "vgg":
        trunk = tv_vgg.make_layers(tv_vgg.cfgs[_VGG_CONFIGS[name.removesuffix("_bn")]], batch_norm=name.endswith("_bn"))
        _init_conv_bn(trunk)
        return trunk, 512
    if family == "resnet":
        full = torchvision.models.get_model(name, weights=None)
        trunk = nn.Sequential(OrderedDict((part, getattr(full, part)) for part in _RESNET_TRUNK))
        return trunk, full.fc.in_features
    if family == "densenet":
        full = torchvision.models.get_model(name, weights=None)
        trunk = full.features
        trunk.add_module("final_relu", nn.ReLU())
        return trunk, full.classifier.in_features
    return _tiny_trunk()


def make_backbone(name: str, pretrained: bool = False, weights_path=None) -> tuple[nn.Module, int]:
    """Build a trunk by name; returns ``(trunk, out_channels)``.

    Args:
        name: one of :data:`BACKBONES`.
        pretrained: load torchvision's ImageNet weights (``IMAGENET1K_V1``, the original's checkpoints) from
            the torch hub cache, downloading them if needed; raises :class:`WeightsUnavailableError` if neither
            works.
        weights_path: a local file with a state dict to load instead: a full torchvision model state dict
            (classifier keys are dropped) or a trunk state dict. Loading is strict: missing or unknown keys
            raise ``ValueError``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}, or pass an nn.Module")
    if pretrained and weights_path is not None:
        raise ValueError("pass either pretrained=True or weights_path, not both")
    if pretrained and name == "tiny":
        raise ValueError("the 'tiny' backbone has no pretrained weights")
    trunk, out_channels = _build(name)
    if pretrained:
        load_backbone_state(trunk, name, _imagenet_state_dict(name), source=f"torchvision ImageNet weights for {name}")
    elif weights_path is not None:
        load_backbone_state(trunk, name, _read_state_file(weights_path), source=str(weights_path))
    return trunk, out_channels


def _imagenet_url(name: str) -> str:
    return torchvision.models.get_model_weights(name)["IMAGENET1K_V1"].url


def fetch_imagenet_weights(name: str) -> str | None:
    """The torch hub cache's file of torchvision's ImageNet weights for trunk ``name``, downloaded there first
    if it is missing (hash-checked, written whole or not at all), or :class:`WeightsUnavailableError` at once: a
    trainer calls it before reading its data. Nothing is deserialised here (the model loads the file once).
    None for a trunk without such weights."""
    if name == "tiny" or name not in BACKBONES:
        return None
    url = _imagenet_url(name)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(cached):
        shown = socket.getdefaulttimeout()
        if shown is None:  # (torch.hub's urlopen takes none; each read waits at most this; a user's own one is kept)
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(os.path.basename(url))
            torch.hub.download_url_to_file(url, cached, digest.group(1) if digest else None, progress=False)
        except Exception as error:
            raise _unavailable(name, url, error) from error
        finally:
            socket.setdefaulttimeout(shown)
    return cached


def _imagenet_state_dict(name: str) -> dict:
    path = fetch_imagenet_weights(name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file in the cache
        raise WeightsUnavailableError(f"the cached ImageNet weights for {name}, {path}, cannot be read "
                                      f"({type(error).__name__}: {first_line(error)[:200]}): delete the file to "
                                      "download it again") from error


def _unavailable(name: str, url: str, error: Exception) -> WeightsUnavailableError:
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return WeightsUnavailableError(
        f"no ImageNet weights for {name} here (offline?): {url} is neither in the torch hub cache {cache} nor "
        f"downloadable ({type(error).__name__}: {first_line(error)[:200]}); put it in that folder, pass a local "
        "file (pretrained=False with weights_path= / ProtoPNet's backbone_weights=; --no-pretrained "
        "--backbone-weights FILE) or train from scratch (pretrained=False / --no-pretrained)"
    )


def _read_state_file(path) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read backbone weights from {path} ({type(error).__name__}: {error}); "
            "expected a file written by torch.save(model.state_dict(), path)"
        ) from error
    return state


_OLD_DENSE_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def _to_trunk_keys(name: str, state: dict) -> dict:
    """Map a full torchvision model state dict (or a trunk one) onto the trunk's keys."""
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    family = _family(name)
    if family in ("vgg", "densenet") and any(key.startswith("features.") for key in state):
        state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
        state = {key.removeprefix("features."): value for key, value in state.items()}
    if family == "resnet":
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    if family == "densenet":  # checkpoints from before torchvision 0.3 spell 'norm.1' for 'norm1'
        state = {_OLD_DENSE_KEY.sub(r"\1\2.", key): value for key, value in state.items()}
    return state


def load_backbone_state(trunk: nn.Module, name: str, state: dict, source: str = "state dict") -> None:
    """Load ``state`` (full torchvision model or trunk state dict) into ``trunk`` built by ``make_backbone(name)``.

    Strict: raises ``ValueError`` naming the keys if any are missing or unknown, or if shapes differ. BatchNorm's
    ``num_batches_tracked`` counters may be missing (torchvision's older ImageNet files, as its DenseNets and
    VGG-BN, have none; torchvision loads them so too): they keep the trunk's values.
    """
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ValueError(f"{source}: expected a state dict (str -> tensor), got {type(state).__name__}")
    state = _to_trunk_keys(name, state)
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{source}: expected a state dict (str -> tensor), but {not_tensors[0]!r} is a "
                         f"{type(state[not_tensors[0]]).__name__}")
    expected = trunk.state_dict()
    counters = {k: expected[k] for k in expected if k.endswith("num_batches_tracked") and k not in state}
    state = {**state, **counters}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {listed(sorted(missing), 5)}")
        if unexpected:
            parts.append(f"unexpected keys: {listed(sorted(unexpected), 5)}")
        raise ValueError(f"{source} does not fit backbone {name!r}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source} does not fit backbone {name!r}: shape mismatch for {listed(sorted(wrong), 5)}")
    trunk.load_state_dict(state)
