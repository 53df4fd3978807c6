"""``ProtoPNet.from_original_state_dict`` reproduces the original model's outputs."""

import pytest
import torch

from protokern.models import ProtoPNet

from .original import OrigDenseNetFeatures, OrigPPNet, OrigResNetFeatures, OrigVGGFeatures, randomize

CASES = [
    ("vgg11", OrigVGGFeatures, 512, "regular", 96),
    ("resnet18", OrigResNetFeatures, 512, "bottleneck", 64),
    ("densenet121", OrigDenseNetFeatures, 1024, "regular", 64),
]


def _original(name, features_cls, channels, add_on, num_classes=3, per_class=4, dim=24, window=(1, 1),
              activation="log"):
    torch.manual_seed(3)
    original = OrigPPNet(features_cls(name), channels, (num_classes * per_class, dim, *window), num_classes, add_on,
                         prototype_activation_function=activation)
    randomize(original)
    with torch.no_grad():
        original.last_layer.weight.normal_()
    return original.eval()


@pytest.mark.parametrize("name, features_cls, channels, add_on, size", CASES)
def test_outputs_match_the_original(name, features_cls, channels, add_on, size):
    original = _original(name, features_cls, channels, add_on)
    model = ProtoPNet.from_original_state_dict(original.state_dict(), backbone=name).eval()
    assert model.config["add_on"] == add_on and model.num_prototypes == 12 and model.num_classes == 3
    assert model.prototype_classes.tolist() == [j // 4 for j in range(12)]

    _check_same_outputs(original, model, size, float64=name != "densenet121")  # float64 DenseNet is slow on CPU


def _check_same_outputs(original, model, size, float64=True):
    """Both models' (logits, min_distances) on one random batch: equal to float32 rounding, and in float64
    (``float64``) to float64 rounding."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_logits, ref_min = original(x)
        logits, min_d = model(x)
        torch.testing.assert_close(min_d, ref_min, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-3)
        if not float64:
            return
        ref_logits, ref_min = original.double()(x.double())
        logits, min_d = model.double()(x.double())
    torch.testing.assert_close(min_d, ref_min, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logits, ref_logits, atol=1e-7, rtol=1e-7)


def test_import_handles_dataparallel_prefix_and_pruned_models():
    original = _original("vgg11", OrigVGGFeatures, 512, "regular", num_classes=3, per_class=2)
    state = {"module." + k: v for k, v in original.state_dict().items()}
    keep = [0, 2, 3, 5, 4]
    state["module.prototype_vectors"] = state["module.prototype_vectors"][keep]
    state["module.ones"] = state["module.ones"][keep]
    state["module.last_layer.weight"] = state["module.last_layer.weight"][:, keep]
    with pytest.raises(ValueError, match="prototype_classes"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg11")
    model = ProtoPNet.from_original_state_dict(state, backbone="vgg11", prototype_classes=[0, 1, 1, 2, 2])
    assert model.num_prototypes == 5 and model.prototype_classes.tolist() == [0, 1, 1, 2, 2]
    assert torch.equal(model.prototype_layer.prototypes, state["module.prototype_vectors"])


def test_import_errors():
    original = _original("vgg11", OrigVGGFeatures, 512, "regular")
    state = original.state_dict()
    with pytest.raises(ValueError, match="does not fit backbone 'vgg13'"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg13")
    with pytest.raises(ValueError, match="does not fit backbone 'resnet18'"):
        ProtoPNet.from_original_state_dict(state, backbone="resnet18")
    with pytest.raises(ValueError, match="num_classes"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg11", num_classes=5)
    with pytest.raises(ValueError, match="no 'prototype_vectors'"):
        ProtoPNet.from_original_state_dict({"last_layer.weight": torch.zeros(2, 4)}, backbone="vgg11")
    extra = dict(state, stray=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected.*stray"):
        ProtoPNet.from_original_state_dict(extra, backbone="vgg11")
    last = state["last_layer.weight"]
    for bad in (last[0], last[:0]):  # 1-D, no classes
        with pytest.raises(ValueError, match=r"last_layer.weight must be \(num_classes, P\)"):
            ProtoPNet.from_original_state_dict(dict(state, **{"last_layer.weight": bad}), backbone="vgg11")
    with pytest.raises(ValueError, match="'prototype_vectors' is a ndarray"):
        ProtoPNet.from_original_state_dict(dict(state, prototype_vectors=state["prototype_vectors"].numpy()),
                                           backbone="vgg11")
    with pytest.raises(ValueError, match="prototypes_per_class=3 but the state dict has 4"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg11", prototypes_per_class=3)
    assert ProtoPNet.from_original_state_dict(state, backbone="vgg11", prototypes_per_class=4).num_prototypes == 12
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU())  # 32 channels, the state's 512
    with pytest.raises(ValueError, match=r"^original state dict does not fit backbone a Sequential module: ") as info:
        ProtoPNet.from_original_state_dict(state, backbone=trunk, out_channels=32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, features_cls, channels, window, activation", [
    ("vgg11", OrigVGGFeatures, 512, (2, 3), "log"),  # 96 px: a 3 x 3 map, kh != kw
    ("vgg11", OrigVGGFeatures, 512, (3, 3), "linear"),  # a window as large as the map
    ("resnet18", OrigResNetFeatures, 512, (2, 1), "linear"),
])
def test_window_prototypes_and_linear_activation_match_the_original(name, features_cls, channels, window,
                                                                    activation):
    """kh x kw prototype_vectors import with their window inferred, 'linear' with similarity="linear"; the
    outputs equal the original's (its conv formulation over windows), in float64 to rounding."""
    size = 96 if name == "vgg11" else 64
    original = _original(name, features_cls, channels, "regular", window=window, activation=activation)
    model = ProtoPNet.from_original_state_dict(original.state_dict(), backbone=name, similarity=activation).eval()
    assert model.prototype_shape == (12, 24, *window) and model.prototype_layer.similarity == activation
    assert model.config["prototype_size"] == list(window)
    _check_same_outputs(original, model, size)


def test_import_of_window_prototypes_errors():
    state = _original("vgg11", OrigVGGFeatures, 512, "regular", window=(2, 2)).state_dict()
    with pytest.raises(ValueError, match="prototype_size"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg11", prototype_size=(1, 1))
    assert ProtoPNet.from_original_state_dict(state, backbone="vgg11", prototype_size=2).prototype_shape[2:] == (2, 2)
    with pytest.raises(ValueError, match="'log' and 'linear'"):
        ProtoPNet.from_original_state_dict(state, backbone="vgg11", similarity="cosine")


def test_a_one_stage_bottleneck_imports_under_either_name():
    """With C <= 2D the original's bottleneck add-on has two convs, laid out as "regular": both names import."""
    original = _original("vgg11", OrigVGGFeatures, 512, "bottleneck", num_classes=2, per_class=1, dim=256)
    for add_on in ("bottleneck", "regular"):
        model = ProtoPNet.from_original_state_dict(original.state_dict(), backbone="vgg11", add_on=add_on).eval()
        _check_same_outputs(original, model, 64, float64=False)
