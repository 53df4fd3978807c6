"""The ProtoPNet model: trunk -> add-on 1x1 convs -> prototype layer -> last layer (Chen et al. 2019)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from protokern.data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_stats
from protokern.layer import ProtoLayer
from protokern.ops import window_size
from protokern.models.add_on import make_add_on
from protokern.models.backbones import make_backbone
from protokern.models.receptive_field import ReceptiveField, compute_receptive_field
from protokern.utils import listed, positive_int

__all__ = ["ProtoPNet"]

# what ProtoPNet.config holds and from_config takes (the weights come from state_dict)
CONFIG_KEYS = ("backbone", "num_classes", "prototypes_per_class", "prototype_dim", "add_on", "eps", "backend",
               "out_channels", "prototype_classes", "prototype_size", "similarity", "input_mean", "input_std")


class ProtoPNet(nn.Module):
    """ProtoPNet ("this looks like that"): classify by similarity of image patches to learned prototypes.

    Takes normalised images (B, C, S, S): ``(image - input_mean) / input_std`` per channel of images in [0, 1]
    (ImageNet's statistics and RGB by default, as the pretrained trunks want). The trainer, push, pruning, the
    explanations and the metrics normalise with the model's own statistics (``protokern.data.model_input``).

    Args:
        backbone: a name from ``protokern.models.BACKBONES`` or an ``nn.Module`` trunk (then ``out_channels``,
            its number of output channels, is required).
        num_classes: number of classes C.
        prototypes_per_class: prototypes per class; prototype j belongs to class ``j // prototypes_per_class``.
        prototype_dim: prototype depth D (channels of the add-on output).
        add_on: ``'regular'`` or ``'bottleneck'`` (see :func:`protokern.models.make_add_on`).
        pretrained: load torchvision's ImageNet weights into a named trunk.
        backbone_weights: path of a local state dict for a named trunk (see ``make_backbone``).
        prototype_size: (kh, kw) (or k) of each prototype, default (1, 1); compared with every kh x kw window
            of the feature map (no padding), as the original's ``prototype_shape[2:]``.
        similarity: "log" (the original's default activation), "linear" (``-d``, the original's other
            activation) or "cosine"; see :func:`protokern.prototype_similarity`.
        eps, backend: passed to :class:`protokern.ProtoLayer`.
        out_channels: output channels of a module trunk.
        prototype_classes: class index of each prototype, instead of ``prototypes_per_class`` (used to rebuild
            pruned models).
        input_mean, input_std: per-channel statistics the images are normalised with, one value per channel
            the trunk takes (e.g. ``(0.5,)`` and ``(0.25,)`` for a grayscale trunk); default ImageNet's (RGB).

    Attributes: ``features`` (trunk), ``add_on``, ``prototype_layer`` (:class:`protokern.ProtoLayer`),
    ``last_layer`` (Linear(P, C, bias=False)), ``prototype_class_identity`` ((P, C) float one-hot buffer),
    ``receptive_field`` (:class:`~protokern.models.receptive_field.ReceptiveField` of a feature-map cell, or
    None if the trunk's geometry cannot be walked), ``num_prototypes``, ``num_classes``, ``prototype_shape``,
    ``input_mean`` and ``input_std`` (tuples of floats).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        num_classes: int = 200,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        add_on: str = "regular",
        pretrained: bool = False,
        backbone_weights=None,
        eps: float = 1e-4,
        backend: str = "auto",
        out_channels: int | None = None,
        prototype_classes: Sequence[int] | None = None,
        prototype_size=(1, 1),
        similarity: str = "log",
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
    ):
        super().__init__()
        input_mean, input_std = input_stats(input_mean, input_std)
        num_classes = positive_int("num_classes", num_classes)
        prototype_dim = positive_int("prototype_dim", prototype_dim)
        if prototype_classes is None:
            prototypes_per_class = positive_int("prototypes_per_class", prototypes_per_class)
            classes = torch.arange(num_classes * prototypes_per_class) // prototypes_per_class
        else:
            classes = torch.as_tensor(prototype_classes if isinstance(prototype_classes, Tensor)
                                      else list(prototype_classes)).detach().cpu().flatten()
            if classes.numel() and (classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex()):
                raise TypeError(f"prototype_classes must hold integer class indices, got {classes.dtype}")
            classes = classes.long()
            if classes.numel() == 0 or classes.min() < 0 or classes.max() >= num_classes:
                raise ValueError(f"prototype_classes must be a non-empty list of class indices in [0, {num_classes})")
            prototypes_per_class = None

        if isinstance(backbone, str):
            trunk, trunk_channels = make_backbone(backbone, pretrained=pretrained, weights_path=backbone_weights)
            if out_channels is not None and out_channels != trunk_channels:
                raise ValueError(f"out_channels={out_channels} but backbone {backbone!r} gives {trunk_channels}")
            backbone_name = backbone
            if len(input_mean) != 3:
                raise ValueError(f"backbone {backbone!r} takes RGB images: input_mean and input_std need 3 values, "
                                 f"got {len(input_mean)}")
        elif isinstance(backbone, nn.Module):
            if out_channels is None:
                raise ValueError("out_channels (the trunk's output channels) is required when backbone is a module")
            if pretrained or backbone_weights is not None:
                raise ValueError(
                    "pretrained / backbone_weights apply to named backbones; load a module trunk's weights yourself"
                )
            trunk, trunk_channels, backbone_name = backbone, out_channels, None
        else:
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")

        self.features = trunk
        self.add_on = make_add_on(add_on, trunk_channels, prototype_dim)
        self.prototype_layer = ProtoLayer(len(classes), prototype_dim, eps=eps, backend=backend,
                                          prototype_size=prototype_size, similarity=similarity)
        self.last_layer = nn.Linear(len(classes), num_classes, bias=False)
        identity = torch.zeros(len(classes), num_classes)
        identity[torch.arange(len(classes)), classes] = 1.0
        self.register_buffer("prototype_class_identity", identity)
        self.num_classes = num_classes
        self.set_last_layer_incorrect_connection(-0.5)

        try:
            self.receptive_field: ReceptiveField | None = compute_receptive_field(trunk)
        except ValueError as error:
            warnings.warn(f"no receptive field for this trunk ({error}); patch boxes are unavailable", stacklevel=2)
            self.receptive_field = None

        self._config = {  # (keys: CONFIG_KEYS)
            "backbone": backbone_name,
            "num_classes": num_classes,
            "prototypes_per_class": prototypes_per_class,
            "prototype_dim": prototype_dim,
            "add_on": add_on,
            "eps": eps,
            "backend": backend,
            "out_channels": trunk_channels,
            "prototype_classes": None if prototype_classes is None else classes.tolist(),
            "prototype_size": list(self.prototype_layer.prototype_size),
            "similarity": self.prototype_layer.similarity,
            "input_mean": list(input_mean),
            "input_std": list(input_std),
        }

    # ----------------------------------------------------------------------------------------- attributes
    @property
    def num_prototypes(self) -> int:
        """Number of prototypes P."""
        return self.prototype_layer.prototypes.shape[0]

    @property
    def input_mean(self) -> tuple[float, ...]:
        """Per-channel mean the images are normalised with (read-only: part of :attr:`config`)."""
        return tuple(self._config.get("input_mean", IMAGENET_MEAN))  # (a model pickled before they were kept)

    @property
    def input_std(self) -> tuple[float, ...]:
        """Per-channel standard deviation the images are normalised with (read-only: part of :attr:`config`)."""
        return tuple(self._config.get("input_std", IMAGENET_STD))

    @property
    def prototype_shape(self) -> tuple[int, int, int, int]:
        """(P, D, kh, kw), as the original's ``prototype_shape``."""
        return tuple(self.prototype_layer.prototypes.shape)

    @property
    def prototype_classes(self) -> Tensor:
        """(P,) long: class index of each prototype."""
        return self.prototype_class_identity.argmax(dim=1)

    @property
    def config(self) -> dict:
        """Architecture description for :meth:`from_config` (weights come from ``state_dict``)."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: Mapping, backbone: nn.Module | None = None) -> ProtoPNet:
        """Rebuild an (untrained, not pretrained) model from :attr:`config`; then load its ``state_dict``.

        ``backbone`` must be given (the trunk module) when the model was built with a module trunk.
        """
        config = dict(config)
        unknown = sorted(map(str, set(config) - set(CONFIG_KEYS)))  # e.g. pretrained: no download from a file
        if unknown:
            raise ValueError(f"config holds keys ProtoPNet.config never writes: {unknown}")
        if config.get("backbone") is None:
            if backbone is None:
                raise ValueError("this config was made with a module trunk: pass backbone=<the trunk module>")
            config["backbone"] = backbone
        elif backbone is not None:
            raise ValueError(f"config names backbone {config['backbone']!r}; do not pass backbone= as well")
        return cls(**config)

    # ----------------------------------------------------------------------------------------- forward
    def conv_features(self, x: Tensor, autocast_dtype: torch.dtype | None = None, trunk=None) -> Tensor:
        """Features in prototype space, (B, D, H, W): ``add_on(features(x))``.

        Float images are taken in any float dtype: outside autocast they run in the model's dtype (that of
        its first parameter, the trunk's unless it has none), so a ``.double()`` or ``.half()`` model takes the
        float32 images of the loaders, push and explanations. ``autocast_dtype``: the trunk (not the add-on)
        runs under ``torch.autocast`` with it, the add-on in the model's dtype (the trainer's mixed precision,
        which push follows). ``trunk``: a callable run in place of ``features`` (the trainer's compiled one).
        A trunk that does not return (B, C, H, W) feature maps (a classifier's pooled vectors) is a
        one-line ``ValueError``."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        dtype, trunk = self.dtype, self.features if trunk is None else trunk
        if autocast_dtype is None:
            f = trunk(_in_dtype(x, dtype))
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                f = trunk(_in_dtype(x, dtype))
        if not isinstance(f, Tensor) or f.dim() != 4:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"the trunk must return feature maps (B, C, H, W), got {got} (a classifier's pooled "
                             "output? give its convolutional part)")
        return self.add_on(_in_dtype(f, dtype))

    def classify_features(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B, C), min_distances (B, P), similarity (B, P))`` from conv features ``z`` (B, D, H, W)."""
        similarity, min_distances = self.prototype_layer(z)
        return self.class_logits(similarity), min_distances, similarity

    def class_logits(self, similarity: Tensor) -> Tensor:
        """Logits (B, C) of similarities (B, P): the last layer, in its own dtype outside autocast (the layer
        gives float32 similarities for float16 / bfloat16 features, which a ``.half()`` last layer refuses)."""
        return self.last_layer(_in_dtype(similarity, self.last_layer.weight.dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: that of its first floating-point parameter (the trunk's unless it has none)."""
        return next((w.dtype for w in self.parameters() if w.is_floating_point()), torch.float32)

    def forward_with_similarity(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B, C), min_distances (B, P), similarity (B, P))`` in one pass."""
        return self.classify_features(self.conv_features(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, C), min_distances (B, P))`` as the original's ``forward``."""
        logits, min_distances, _ = self.forward_with_similarity(x)
        return logits, min_distances

    # ----------------------------------------------------------------------------------------- editing
    @torch.no_grad()
    def set_last_layer_incorrect_connection(self, incorrect_strength: float = -0.5) -> None:
        """Set last-layer weights to 1 for each prototype's own class and ``incorrect_strength`` elsewhere."""
        own = self.prototype_class_identity.t()
        self.last_layer.weight.copy_(own + incorrect_strength * (1 - own))

    def check_prunable(self) -> None:
        """A one-line ``ValueError`` when pruning would drop a parametrization (``torch.nn.utils.parametrize``)
        of the prototype layer or the last layer: it builds both anew."""
        for name in ("prototype_layer", "last_layer"):
            if nn.utils.parametrize.is_parametrized(getattr(self, name)):
                raise ValueError(f"pruning builds a new {name.replace('_', ' ')}, without the parametrization "
                                 "(torch.nn.utils.parametrize) of this one: remove it before pruning, register it "
                                 "again after")

    @torch.no_grad()
    def prune_prototypes(self, indices) -> None:
        """Remove the prototypes at ``indices`` (integers, or a boolean mask of all P prototypes) with their
        last-layer columns and class-identity rows.

        The prototype layer and last layer are replaced by new modules (as the original replaces the
        parameters): rebuild optimisers afterwards.
        """
        num = self.num_prototypes
        drop = prototype_indices(indices, num)
        if drop.numel() and (drop.min() < 0 or drop.max() >= num):
            raise IndexError(f"prototype indices must be in [0, {num}), got {drop.tolist()}")
        keep_mask = torch.ones(num, dtype=torch.bool)
        keep_mask[drop] = False
        keep = keep_mask.nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError("cannot prune every prototype")

        self.check_prunable()
        old_layer, old_last = self.prototype_layer, self.last_layer
        prototypes = old_layer.prototypes
        layer = ProtoLayer(keep.numel(), prototypes.shape[1], eps=old_layer.eps, backend=old_layer.backend,
                           precision=old_layer.precision, prototype_size=old_layer.prototype_size,
                           similarity=old_layer.similarity)
        layer = layer.to(device=prototypes.device, dtype=prototypes.dtype)
        layer.prototypes.copy_(prototypes[keep.to(prototypes.device)])
        layer.prototypes.requires_grad_(prototypes.requires_grad)
        layer.train(old_layer.training)

        weight = old_last.weight
        last = nn.Linear(keep.numel(), self.num_classes, bias=False).to(device=weight.device, dtype=weight.dtype)
        last.weight.copy_(weight[:, keep.to(weight.device)])
        last.weight.requires_grad_(weight.requires_grad)
        last.train(old_last.training)

        self.prototype_layer, self.last_layer = layer, last
        self.prototype_class_identity = self.prototype_class_identity[keep.to(self.prototype_class_identity.device)]
        self._config["prototype_classes"] = self.prototype_classes.tolist()
        self._config["prototypes_per_class"] = None

    # ----------------------------------------------------------------------------------------- import
    @classmethod
    def from_original_state_dict(cls, state_dict, **kwargs) -> ProtoPNet:
        """Import a state dict of the original implementation (cfchen-duke/ProtoPNet ``PPNet``).

        Keys: ``features.*`` (the original's VGG / DenseNet feature classes nest torchvision's layers one
        level deeper, ``features.features.*``; its ResNet uses torchvision's names), ``add_on_layers.*``,
        ``prototype_vectors`` (P, D, kh, kw), ``ones``, ``last_layer.weight`` (C, P). A ``module.`` prefix
        (DataParallel) is stripped; an ``nn.Module`` is taken by its ``state_dict()``.

        ``kwargs`` go to the constructor; ``backbone`` must name the original's base architecture (default
        'vgg19', as the constructor) or be a module trunk. ``num_classes``, ``prototype_dim``,
        ``prototype_size``, ``prototypes_per_class`` and ``add_on`` are inferred. The original saves neither
        its ``prototype_activation_function`` nor the class identity: for a model trained with 'linear' pass
        ``similarity="linear"`` (default "log"), for a pruned model pass ``prototype_classes``.
        """
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        state = {key.removeprefix("module."): value for key, value in state_dict.items()}
        for key in ("prototype_vectors", "last_layer.weight"):
            if key not in state:
                raise ValueError(f"not a state dict of the original ProtoPNet: no {key!r}")
        not_tensors = [key for key, value in state.items() if not isinstance(value, Tensor)]
        if not_tensors:
            raise ValueError(f"not a state dict of tensors: {not_tensors[0]!r} is a "
                             f"{type(state[not_tensors[0]]).__name__}")
        vectors, last = state["prototype_vectors"], state["last_layer.weight"]
        if vectors.dim() != 4 or 0 in vectors.shape:
            raise ValueError(f"prototype_vectors must be (P, D, kh, kw), got {tuple(vectors.shape)}")
        if last.dim() != 2 or last.shape[0] == 0:
            raise ValueError(f"last_layer.weight must be (num_classes, P), got {tuple(last.shape)}")
        if kwargs.get("similarity", "log") not in ("log", "linear"):
            raise ValueError(f"the original's activations are 'log' and 'linear', got similarity="
                             f"{kwargs['similarity']!r}")
        num_prototypes, prototype_dim = vectors.shape[:2]
        num_classes = last.shape[0]
        if last.shape[1] != num_prototypes:
            raise ValueError(f"last_layer.weight {tuple(last.shape)} does not fit {num_prototypes} prototypes")

        add_on_convs = {m.group(1) for key in state if (m := re.fullmatch(r"add_on_layers\.(\d+)\.weight", key))}
        inferred = {
            "num_classes": num_classes,
            "prototype_dim": prototype_dim,
            "add_on": "regular" if len(add_on_convs) == 2 else "bottleneck",
            "prototype_size": tuple(vectors.shape[2:]),
        }
        for key, value in inferred.items():
            if key == "prototype_size" and key in kwargs:  # k, [kh, kw] or (kh, kw), as ProtoLayer takes it
                kwargs[key] = window_size(kwargs[key])
            if key == "add_on" and key in kwargs:  # a one-stage bottleneck has two convs, as "regular": the
                continue  # weights' keys and shapes decide below
            if kwargs.setdefault(key, value) != value:
                raise ValueError(f"{key}={kwargs[key]!r} but the state dict has {value!r}")
        if kwargs.get("prototype_classes") is None:
            if num_prototypes % num_classes:
                raise ValueError(
                    f"{num_prototypes} prototypes for {num_classes} classes: pass prototype_classes= (pruned model?)"
                )
            per_class = num_prototypes // num_classes
            if kwargs.setdefault("prototypes_per_class", per_class) != per_class:
                raise ValueError(f"prototypes_per_class={kwargs['prototypes_per_class']!r} but the state dict has "
                                 f"{per_class} ({num_prototypes} prototypes, {num_classes} classes)")
        model = cls(**kwargs)

        target = model.state_dict()
        mapped = {
            "prototype_layer.prototypes": vectors,
            "last_layer.weight": last,
            **{"add_on." + k.removeprefix("add_on_layers."): v
               for k, v in state.items() if k.startswith("add_on_layers.")},
            **_original_feature_keys(state, model.features),
        }
        needed = {k for k in target if k.startswith(("features.", "add_on.")) and not k.endswith("num_batches_tracked")}
        needed |= {"prototype_layer.prototypes", "last_layer.weight"}
        used = {"prototype_vectors", "ones", "last_layer.weight"}
        used |= {k for k in state if k.startswith(("features.", "add_on_layers."))}
        problems = []
        if needed - set(mapped):
            problems.append(f"missing: {listed(sorted(needed - set(mapped)), 5)}")
        if set(mapped) - set(target) or set(state) - used:
            problems.append(f"unexpected: {listed(sorted((set(mapped) - set(target)) | (set(state) - used)), 5)}")
        problems += [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
                     if k in target and v.shape != target[k].shape]
        if problems:
            trunk = kwargs.get("backbone", "vgg19")
            name = repr(trunk) if isinstance(trunk, str) else f"a {type(trunk).__name__} module"
            raise ValueError(f"original state dict does not fit backbone {name}: " + "; ".join(problems))
        target.update(mapped)
        model.load_state_dict(target)
        return model


def prototype_indices(indices, num: int) -> Tensor:
    """``indices`` of ``num`` prototypes (integers, or a boolean mask with one entry per prototype) as a flat
    int64 tensor; one-line errors for a mask of another length and for non-integers."""
    t = torch.as_tensor(indices).detach().cpu()
    if t.dtype == torch.bool:
        if t.shape != (num,):
            raise ValueError(f"a boolean mask of prototypes must have shape ({num},), one entry per prototype, got "
                             f"{tuple(t.shape)}")
        return t.nonzero().flatten()
    if t.numel() and (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"prototype indices must be integers (or a boolean mask), got {t.dtype}")
    return t.long().flatten()


def _in_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Float ``x`` in ``dtype``, except under autocast (which chooses the dtypes itself)."""
    if x.dtype == dtype or not x.is_floating_point():
        return x
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return x
    return x.to(dtype)


def _original_feature_keys(state: dict, trunk: nn.Module) -> dict:
    """Rename the original's ``features.*`` keys to ours: as they are, or one ``features.`` level less."""
    original = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    ours = {k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")}
    candidates = [original, {k.removeprefix("features."): v for k, v in original.items() if k.startswith("features.")}]
    for candidate in candidates:
        if {k for k in candidate if not k.endswith("num_batches_tracked")} == ours:
            return {"features." + k: v for k, v in candidate.items()}
    return {"features." + k: v for k, v in original.items()}  # reported as missing / unexpected by the caller
