import numpy as np
import pytest
import torch
from torch import nn

from protokern import prototype_distances
from protokern.losses import ProtoPNetLoss
from protokern.models import ProtoPNet, make_backbone
from protokern.models.receptive_field import backbone_receptive_field


def _tiny_model(**kwargs):
    options = dict(backbone="tiny", num_classes=3, prototypes_per_class=2, prototype_dim=16)
    options.update(kwargs)
    return ProtoPNet(**options).eval()


@pytest.mark.parametrize(
    "name, size, cells", [("tiny", 64, 8), ("vgg11", 64, 2), ("resnet18", 64, 2), ("densenet121", 64, 2)]
)
def test_shapes_and_consistency(name, size, cells):
    model = ProtoPNet(name, num_classes=4, prototypes_per_class=3, prototype_dim=32).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, min_d, sim = model.forward_with_similarity(x)
        logits2, min_d2 = model(x)
        z = model.conv_features(x)
        distances = prototype_distances(z, model.prototype_layer.prototypes)
        logits3, min_d3, _ = model.classify_features(z)
    assert logits.shape == (2, 4) and min_d.shape == sim.shape == (2, 12)
    assert z.shape == (2, 32, cells, cells) and distances.shape == (2, 12, cells, cells)
    assert torch.equal(logits, logits2) and torch.equal(min_d, min_d2)
    assert torch.equal(logits, logits3) and torch.equal(min_d, min_d3)
    torch.testing.assert_close(distances.flatten(2).amin(2).clamp_min(0), min_d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sim, torch.log((min_d + 1) / (min_d + 1e-4)))
    torch.testing.assert_close(logits, sim @ model.last_layer.weight.t())
    assert model.num_prototypes == 12 and model.num_classes == 4 and model.prototype_shape == (12, 32, 1, 1)
    rf = backbone_receptive_field(name)
    ours = model.receptive_field
    assert (ours.jump, ours.size, ours.start) == (rf.jump, rf.size, rf.start)


def test_class_identity_and_last_layer_init():
    model = _tiny_model(num_classes=4, prototypes_per_class=3)
    identity = model.prototype_class_identity
    assert identity.dtype == torch.float32 and identity.shape == (12, 4)
    for j in range(12):
        assert identity[j].tolist() == [1.0 if c == j // 3 else 0.0 for c in range(4)]
    assert "prototype_class_identity" in dict(model.named_buffers())
    assert model.prototype_classes.tolist() == [j // 3 for j in range(12)]
    w = model.last_layer.weight
    assert model.last_layer.bias is None and w.shape == (4, 12)
    assert torch.equal(w, torch.where(identity.t() > 0, 1.0, -0.5))
    model.set_last_layer_incorrect_connection(0.0)
    assert torch.equal(model.last_layer.weight, identity.t())
    p = model.prototype_layer.prototypes
    assert p.shape == (12, 16, 1, 1) and 0 <= p.min() and p.max() < 1


def test_gradients_reach_every_part():
    model = _tiny_model().train()
    logits, min_d = model(torch.randn(4, 3, 64, 64))
    total, _ = ProtoPNetLoss()(logits, min_d, torch.tensor([0, 1, 2, 0]), model)
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prune_prototypes():
    model = _tiny_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, min_d, sim = model.forward_with_similarity(x)
    old_p = model.prototype_layer.prototypes.detach().clone()
    old_w = model.last_layer.weight.detach().clone()
    old_identity = model.prototype_class_identity.clone()

    model.prune_prototypes([0, 3, 3, 5])
    keep = [1, 2, 4]
    assert model.num_prototypes == 3 and model.prototype_shape == (3, 16, 1, 1)
    assert torch.equal(model.prototype_layer.prototypes, old_p[keep])
    assert torch.equal(model.last_layer.weight, old_w[:, keep]) and model.last_layer.in_features == 3
    assert torch.equal(model.prototype_class_identity, old_identity[keep])
    assert model.prototype_classes.tolist() == [0, 1, 2]
    assert model.prototype_layer.prototypes.requires_grad
    with torch.no_grad():
        logits_new, min_d_new = model(x)
    torch.testing.assert_close(min_d_new, min_d[:, keep])
    torch.testing.assert_close(logits_new, sim[:, keep] @ old_w[:, keep].t())

    rebuilt = ProtoPNet.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[0], logits_new)
    assert torch.equal(rebuilt.prototype_class_identity, model.prototype_class_identity)

    with pytest.raises(IndexError):
        model.prune_prototypes([3])
    with pytest.raises(ValueError, match="every prototype"):
        model.prune_prototypes([0, 1, 2])
    model.prune_prototypes([])
    assert model.num_prototypes == 3
    with pytest.raises(TypeError, match="must be integers"):
        model.prune_prototypes([1.9])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model.prune_prototypes([True, False])
    model.prune_prototypes(np.array([False, False, True]))  # a mask: prototype 2 goes, not 0 and 1
    assert torch.equal(model.prototype_layer.prototypes, old_p[[1, 2]])


def test_config_round_trip():
    model = _tiny_model(add_on="bottleneck", eps=1e-3)
    config = model.config
    assert config["backbone"] == "tiny" and config["add_on"] == "bottleneck" and config["eps"] == 1e-3
    rebuilt = ProtoPNet.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt.eval()(x)):
            assert torch.equal(a, b)

    trunk, channels = make_backbone("tiny")
    custom = ProtoPNet(trunk, num_classes=2, prototypes_per_class=1, prototype_dim=8, out_channels=channels)
    assert custom.config["backbone"] is None and custom.features is trunk
    with pytest.raises(ValueError, match="backbone="):
        ProtoPNet.from_config(custom.config)
    again = ProtoPNet.from_config(custom.config, backbone=make_backbone("tiny")[0])
    again.load_state_dict(custom.state_dict())


def test_backbone_weights_from_a_local_file(tmp_path):
    source, _ = make_backbone("tiny")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    torch.save(source.state_dict(), tmp_path / "trunk.pt")
    model = _tiny_model(backbone_weights=tmp_path / "trunk.pt")
    for k, v in source.state_dict().items():
        assert torch.equal(model.features.state_dict()[k], v)
    assert model.config.get("backbone_weights") is None  # config describes architecture only


def test_custom_trunk_without_geometry_warns():
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(4))
    with pytest.warns(UserWarning, match="receptive field"):
        model = ProtoPNet(trunk, num_classes=2, prototypes_per_class=1, prototype_dim=4, out_channels=8)
    assert model.receptive_field is None
    assert model(torch.randn(1, 3, 20, 20))[0].shape == (1, 2)


def test_a_trunk_returning_vectors_is_one_line():
    """A classifier with its head taken off (fc = Identity) returns pooled vectors: the add-on's conv2d error
    ('Expected 3D (unbatched) or 4D (batched) input') did not say the trunk was wrong."""
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.warns(UserWarning, match="receptive field"):
        model = ProtoPNet(trunk, num_classes=2, prototypes_per_class=1, prototype_dim=4, out_channels=8)
    with pytest.raises(ValueError, match=r"the trunk must return feature maps \(B, C, H, W\), got \(1, 8\)"):
        model(torch.randn(1, 3, 20, 20))


def test_autocast_trunk_runs_the_add_on_in_the_models_dtype():
    """conv_features(autocast_dtype=...) is the trainer's mixed-precision forward, which push follows: the trunk
    under autocast, the add-on in the model's dtype; trunk= stands for features (a compiled one)."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8)
    x = torch.rand(2, 3, 32, 32)
    seen = []
    z = model.conv_features(x, autocast_dtype=torch.bfloat16, trunk=lambda t: seen.append(t.dtype) or
                            model.features(t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = model.features(x)
    assert z.dtype == torch.float32 and seen == [torch.float32]
    assert torch.equal(z, model.add_on(f.float()))
    assert not torch.equal(z, model.conv_features(x))  # the trunk did run in bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        ProtoPNet("alexnet")
    with pytest.raises(ValueError, match="out_channels"):
        ProtoPNet(nn.Conv2d(3, 8, 3), num_classes=2)
    with pytest.raises(TypeError):
        ProtoPNet(42)
    with pytest.raises(ValueError, match="gives 64"):
        ProtoPNet("tiny", out_channels=32)
    with pytest.raises(ValueError, match="num_classes"):
        ProtoPNet("tiny", num_classes=0)
    with pytest.raises(TypeError, match="num_classes"):
        ProtoPNet("tiny", num_classes=2.0)
    numpy_ints = ProtoPNet("tiny", num_classes=np.int64(3), prototypes_per_class=np.int32(2), prototype_dim=np.int64(8))
    assert numpy_ints.num_prototypes == 6 and all(type(numpy_ints.config[k]) is int
                                                  for k in ("num_classes", "prototypes_per_class", "prototype_dim"))
    with pytest.raises(ValueError, match="unknown add-on"):
        ProtoPNet("tiny", num_classes=2, add_on="fancy")
    with pytest.raises(ValueError, match="prototype_classes"):
        ProtoPNet("tiny", num_classes=2, prototype_classes=[0, 2])
    for not_indices in ([0.9, 1.5], [True, False], torch.tensor([0.0, 1.0])):  # were truncated / cast to 0, 1
        with pytest.raises(TypeError, match="prototype_classes must hold integer class indices"):
            ProtoPNet("tiny", num_classes=2, prototype_classes=not_indices)
    assert ProtoPNet("tiny", num_classes=3, prototype_dim=4,
                     prototype_classes=torch.tensor([2, 0])).prototype_classes.tolist() == [2, 0]
    with pytest.raises(ValueError, match="pretrained"):
        ProtoPNet(nn.Conv2d(3, 8, 3), num_classes=2, out_channels=8, pretrained=True)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _tiny_model()(torch.randn(3, 64, 64))


def test_pruning_keeps_the_layer_settings():
    model = _tiny_model(num_classes=3, prototypes_per_class=2, eps=1e-3, prototype_size=2, similarity="linear")
    model.prototype_layer.precision = "high"
    model.prototype_layer.prototypes.requires_grad_(False)  # frozen (the last-layer stage): still frozen
    model.prune_prototypes([1])
    layer = model.prototype_layer
    assert (layer.precision, layer.backend, layer.eps, model.num_prototypes) == ("high", "auto", 1e-3, 5)
    assert (layer.prototype_size, layer.similarity) == ((2, 2), "linear")
    assert not layer.prototypes.requires_grad and model.last_layer.weight.requires_grad
    model.last_layer.weight.requires_grad_(False)
    model.prototype_layer.prototypes.requires_grad_(True)
    model.prune_prototypes([0])
    assert model.prototype_layer.prototypes.requires_grad and not model.last_layer.weight.requires_grad


def test_a_model_on_the_meta_device_runs_its_forward():
    """Shapes only (memory planning): no autocast query for a device autocast does not know."""
    with torch.device("meta"):
        model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8)
    for dtype in (torch.float32, torch.float16):
        logits, min_distances = model(torch.empty(2, 3, 32, 32, device="meta", dtype=dtype))
        assert logits.shape == (2, 3) and min_distances.shape == (2, 6) and logits.is_meta


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_train_forward_runs_a_model_in_its_dtype(dtype):
    from protokern.train.loop import TrainForward

    model = _tiny_model().to(dtype)
    logits, min_distances = TrainForward(model)(torch.rand(2, 3, 64, 64))
    assert logits.dtype == dtype and min_distances.shape == (2, 6)


def test_negative_prototype_indices_are_an_index_error():
    """prune_prototypes([-1]) raises IndexError (indices in [0, P)) and leaves the model as it was, instead of
    removing the last prototype as Python's negative indexing would."""
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=2, prototype_dim=8)
    before = model.prototype_layer.prototypes.detach().clone()
    for bad in ([-1], [0, -2], torch.tensor([-4])):
        with pytest.raises(IndexError, match=r"prototype indices must be in \[0, 4\)"):
            model.prune_prototypes(bad)
    assert model.num_prototypes == 4 and torch.equal(model.prototype_layer.prototypes, before)


def test_backbone_weights_for_a_module_trunk_are_refused(tmp_path):
    """backbone_weights applies to named backbones: given with a module trunk it is a ValueError (the weights
    would silently not be loaded)."""
    trunk, channels = make_backbone("tiny")
    with pytest.raises(ValueError, match="pretrained / backbone_weights apply to named backbones"):
        ProtoPNet(trunk, num_classes=2, prototypes_per_class=1, prototype_dim=8, out_channels=channels,
                  backbone_weights=str(tmp_path / "w.pt"))


def test_from_config_of_a_named_backbone_refuses_backbone_module():
    """A config naming its backbone ("tiny") plus backbone=<module> is a ValueError (which trunk is meant is
    ambiguous), not a model silently built around the module."""
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8)
    with pytest.raises(ValueError, match="do not pass backbone="):
        ProtoPNet.from_config(model.config, backbone=make_backbone("tiny")[0])
