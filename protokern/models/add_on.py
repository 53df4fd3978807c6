"""Add-on layers: 1x1 convolutions mapping trunk features (C channels) to the prototype space (D channels)."""

from __future__ import annotations

from torch import nn

from protokern.utils import positive_int

__all__ = ["ADD_ONS", "make_add_on"]

ADD_ONS = ("regular", "bottleneck")


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


def make_add_on(kind: str, in_channels: int, prototype_dim: int) -> nn.Sequential:
    """Build the add-on layers as in the original ProtoPNet (same layer order, so state-dict indices match).

    - ``'regular'``: Conv1x1(C->D), ReLU, Conv1x1(D->D), Sigmoid (the paper's runs).
    - ``'bottleneck'``: stages of Conv1x1(c->c'), ReLU, Conv1x1(c'->c') with ``c' = max(D, c // 2)``, each
      stage followed by ReLU, the last (``c' = D``) by Sigmoid; at least one stage.

    Convolutions get kaiming-normal (fan_out, relu) weights and zero bias.
    """
    in_channels, prototype_dim = positive_int("in_channels", in_channels), positive_int("prototype_dim", prototype_dim)
    if kind == "regular":
        layers = [_conv1x1(in_channels, prototype_dim), nn.ReLU(), _conv1x1(prototype_dim, prototype_dim), nn.Sigmoid()]
    elif kind == "bottleneck":
        layers, channels = [], in_channels
        while channels > prototype_dim or not layers:
            out = max(prototype_dim, channels // 2)
            last = out == prototype_dim
            layers += [_conv1x1(channels, out), nn.ReLU(), _conv1x1(out, out), nn.Sigmoid() if last else nn.ReLU()]
            channels = out
    else:
        raise ValueError(f"unknown add-on kind {kind!r}; choose one of {', '.join(ADD_ONS)}")
    add_on = nn.Sequential(*layers)
    for m in add_on.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return add_on
