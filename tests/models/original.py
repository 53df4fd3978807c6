"""A small, faithful re-statement of the original ProtoPNet (cfchen-duke/ProtoPNet) for equivalence tests.

Written from the facts in shared/reference/original-protopnet.md and the original's module layout: feature
classes that nest torchvision layers (VGG / DenseNet under ``.features``, ResNet with torchvision's names),
``add_on_layers``, ``prototype_vectors``, ``ones``, ``last_layer``; distances by the conv2d expansion with
ReLU (over kh x kw windows for (P, D, kh, kw) prototypes), min-pooling by ``-max_pool2d(-d)``, 'log' or
'linear' activation.
"""


import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import vgg as tv_vgg

VGG_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


class OrigVGGFeatures(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.features = tv_vgg.make_layers(tv_vgg.cfgs[VGG_CFG[name]], batch_norm=False)

    def forward(self, x):
        return self.features(x)


class OrigResNetFeatures(nn.Module):
    def __init__(self, name):
        super().__init__()
        full = torchvision.models.get_model(name, weights=None)
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, part, getattr(full, part))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class OrigDenseNetFeatures(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.features = torchvision.models.get_model(name, weights=None).features
        self.features.add_module("final_relu", nn.ReLU(inplace=True))

    def forward(self, x):
        return self.features(x)


def original_add_on(kind, in_channels, d):
    """The original's add-on construction (note: the bottleneck loop halves ``in`` itself, not ``out``)."""
    if kind == "regular":
        return nn.Sequential(nn.Conv2d(in_channels, d, 1), nn.ReLU(), nn.Conv2d(d, d, 1), nn.Sigmoid())
    layers, current_in = [], in_channels
    while current_in > d or len(layers) == 0:
        current_out = max(d, current_in // 2)
        layers += [nn.Conv2d(current_in, current_out, 1), nn.ReLU(), nn.Conv2d(current_out, current_out, 1)]
        layers.append(nn.ReLU() if current_out > d else nn.Sigmoid())
        current_in = current_in // 2
    return nn.Sequential(*layers)


class OrigPPNet(nn.Module):
    def __init__(self, features, in_channels, prototype_shape, num_classes, add_on="regular",
                 prototype_activation_function="log"):
        super().__init__()
        self.prototype_activation_function = prototype_activation_function
        self.prototype_shape = prototype_shape
        self.num_prototypes = prototype_shape[0]
        self.epsilon = 1e-4
        self.features = features
        self.add_on_layers = original_add_on(add_on, in_channels, prototype_shape[1])
        self.prototype_vectors = nn.Parameter(torch.rand(prototype_shape))
        self.ones = nn.Parameter(torch.ones(prototype_shape), requires_grad=False)
        self.last_layer = nn.Linear(self.num_prototypes, num_classes, bias=False)

    def _l2_convolution(self, x):
        x2_patch_sum = F.conv2d(x**2, weight=self.ones)
        p2 = torch.sum(self.prototype_vectors**2, dim=(1, 2, 3)).view(-1, 1, 1)
        xp = F.conv2d(x, weight=self.prototype_vectors)
        return F.relu(x2_patch_sum - 2 * xp + p2)

    def forward(self, x):
        distances = self._l2_convolution(self.add_on_layers(self.features(x)))
        min_distances = -F.max_pool2d(-distances, kernel_size=(distances.size(2), distances.size(3)))
        min_distances = min_distances.view(-1, self.num_prototypes)
        if self.prototype_activation_function == "log":
            activations = torch.log((min_distances + 1) / (min_distances + self.epsilon))
        else:  # 'linear'
            activations = -min_distances
        return self.last_layer(activations), min_distances


def randomize(module, seed=0):
    """Give every parameter and BN buffer non-default random values (so a wrong mapping shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def original_layer_lists(name):
    """The original's conv_info() (kernel sizes, strides, paddings) for a backbone name."""
    if name.startswith("vgg"):
        layers = [(2, 2, 0) if v == "M" else (3, 1, 1) for v in tv_vgg.cfgs[VGG_CFG[name.removesuffix("_bn")]]]
        return tuple(list(column) for column in zip(*layers))
    if name.startswith("resnet"):
        blocks = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
                  "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3]}[name]
        bottleneck = name not in ("resnet18", "resnet34")
        ks, ss, ps = [7, 3], [2, 2], [3, 1]
        for stage, n in enumerate(blocks):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                if bottleneck:
                    ks, ss, ps = ks + [1, 3, 1], ss + [1, stride, 1], ps + [0, 1, 0]
                else:
                    ks, ss, ps = ks + [3, 3], ss + [stride, 1], ps + [1, 1]
        return ks, ss, ps
    if name.startswith("densenet"):
        blocks = {"densenet121": (6, 12, 24, 16), "densenet161": (6, 12, 36, 24),
                  "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}[name]
        ks, ss, ps = [7, 3], [2, 2], [3, 1]
        for i, n in enumerate(blocks):
            ks, ss, ps = ks + [1, 3] * n, ss + [1, 1] * n, ps + [0, 1] * n
            if i != len(blocks) - 1:  # transition: 1x1 conv, 2x2 average pool
                ks, ss, ps = ks + [1, 2], ss + [1, 2], ps + [0, 0]
        return ks, ss, ps
    raise KeyError(name)


def original_rf_info(img_size, ks, ss, ps, prototype_kernel_size=1):
    """The original's compute_proto_layer_rf_info_v2 (integer paddings, then a k x k VALID prototype layer)."""
    n, j, r, start = img_size, 1, 1, 0.5
    for k, s, p in list(zip(ks, ss, ps)) + [(prototype_kernel_size, 1, 0)]:
        n_out = (n - k + 2 * p) // s + 1
        start = start + ((k - 1) / 2 - p) * j
        r = r + (k - 1) * j
        j = j * s
        n = n_out
    return [n, j, r, start]


def original_rf_box(img_size, h, w, rf_info):
    """The original's compute_rf_protoL_at_spatial_location: [y0, y1, x0, x1] of output cell (h, w)."""
    import math

    _, j, r, start = rf_info
    center_h, center_w = start + h * j, start + w * j
    return (max(int(math.floor(center_h - r / 2)), 0), min(int(math.floor(center_h + r / 2)), img_size),
            max(int(math.floor(center_w - r / 2)), 0), min(int(math.floor(center_w + r / 2)), img_size))
