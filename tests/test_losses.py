from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from protokern.losses import ProtoPNetLoss, protopnet_loss_terms


def _fake_model(num_classes=3, per_class=2, dim=8, weight=None):
    num = num_classes * per_class
    identity = torch.zeros(num, num_classes)
    identity[torch.arange(num), torch.arange(num) // per_class] = 1
    if weight is None:
        weight = identity.t() - 0.5 * (1 - identity.t())
    return SimpleNamespace(
        prototype_class_identity=identity,
        last_layer=SimpleNamespace(weight=weight.clone().requires_grad_(True)),
        prototype_shape=(num, dim, 1, 1),
        prototype_layer=SimpleNamespace(max_distance=float(dim)),  # D * 1 * 1, as ProtoLayer.max_distance
    )


def _original_loss(output, min_distances, label, model):
    """The original train_and_test.py formulas (class_specific=True, use_l1_mask=True), restated."""
    cross_entropy = torch.nn.functional.cross_entropy(output, label)
    max_dist = model.prototype_shape[1] * model.prototype_shape[2] * model.prototype_shape[3]
    prototypes_of_correct_class = torch.t(model.prototype_class_identity[:, label])
    inverted_distances, _ = torch.max((max_dist - min_distances) * prototypes_of_correct_class, dim=1)
    cluster_cost = torch.mean(max_dist - inverted_distances)
    prototypes_of_wrong_class = 1 - prototypes_of_correct_class
    inverted_distances_to_nontarget_prototypes, _ = torch.max(
        (max_dist - min_distances) * prototypes_of_wrong_class, dim=1
    )
    separation_cost = torch.mean(max_dist - inverted_distances_to_nontarget_prototypes)
    avg_separation_cost = torch.sum(min_distances * prototypes_of_wrong_class, dim=1) / torch.sum(
        prototypes_of_wrong_class, dim=1
    )
    avg_separation_cost = torch.mean(avg_separation_cost)
    l1_mask = 1 - torch.t(model.prototype_class_identity)
    l1 = (model.last_layer.weight * l1_mask).norm(p=1)
    loss = cross_entropy + 0.8 * cluster_cost - 0.08 * separation_cost + 1e-4 * l1
    return loss, dict(ce=cross_entropy, cluster=cluster_cost, separation=separation_cost,
                      avg_separation=avg_separation_cost, l1=l1)


def test_hand_computed_values():
    model = _fake_model(num_classes=2, per_class=2, dim=8)
    min_d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 9.0, 6.0, 2.5]])  # 9 > max_dist = 8
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 0])
    total, terms = ProtoPNetLoss()(logits, min_d, target, model)
    ce = (F.softmax(logits, 1)[:, 0].log().neg()).mean().item()
    assert terms["ce"] == pytest.approx(ce)
    assert terms["cluster"] == pytest.approx((1.0 + 0.5) / 2)
    assert terms["separation"] == pytest.approx((3.0 + 2.5) / 2)
    assert terms["avg_separation"] == pytest.approx((3.5 + 4.25) / 2)
    assert terms["l1"] == pytest.approx(4 * 0.5)  # 4 wrong-class connections of -0.5
    expected = ce + 0.8 * 0.75 - 0.08 * 2.75 + 1e-4 * 2.0
    assert terms["total"] == pytest.approx(expected) and total.item() == pytest.approx(expected)
    assert set(terms) == {"ce", "cluster", "separation", "avg_separation", "l1", "total"}
    assert all(isinstance(v, float) for v in terms.values())


def test_original_max_dist_bound():
    """All own-class distances above max_dist: the original's formula counts max_dist."""
    model = _fake_model(num_classes=2, per_class=2, dim=8)
    min_d = torch.tensor([[10.0, 12.0, 1.0, 2.0]])
    _, terms = ProtoPNetLoss()(torch.zeros(1, 2), min_d, torch.tensor([0]), model)
    assert terms["cluster"] == 8.0 and terms["separation"] == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_matches_the_original_formulas_values_and_gradients(ties):
    torch.manual_seed(0)
    model = _fake_model(num_classes=5, per_class=3, dim=16, weight=torch.randn(5, 15))
    logits = torch.randn(6, 5, requires_grad=True)
    min_d = torch.rand(6, 15) * 20
    if ties:  # duplicate prototypes (pushed onto one patch): equal distances in every class, own and other
        min_d = min_d.view(6, 5, 3)[:, :, :1].expand(6, 5, 3).reshape(6, 15).clone()
    min_d.requires_grad_(True)
    target = torch.tensor([0, 4, 2, 2, 1, 3])

    ref_total, ref_terms = _original_loss(logits, min_d, target, model)
    ref_grads = torch.autograd.grad(ref_total, (logits, min_d, model.last_layer.weight))
    total, terms = ProtoPNetLoss()(logits, min_d, target, model)
    grads = torch.autograd.grad(total, (logits, min_d, model.last_layer.weight))

    for name, value in ref_terms.items():
        assert terms[name] == pytest.approx(value.item(), rel=1e-6), name
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_custom_weights_and_functional_terms():
    model = _fake_model()
    logits, min_d, target = torch.randn(4, 3), torch.rand(4, 6) * 5, torch.tensor([0, 1, 2, 1])
    terms = protopnet_loss_terms(logits, min_d, target, model.prototype_class_identity, model.last_layer.weight, 8)
    total, logged = ProtoPNetLoss(cross_entropy=2.0, cluster=0.0, separation=-1.0, l1=0.5)(logits, min_d, target, model)
    expected = 2 * terms["ce"] - terms["separation"] + 0.5 * terms["l1"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logged["cluster"] == pytest.approx(terms["cluster"].item())


def test_shape_errors():
    model = _fake_model()
    loss = ProtoPNetLoss()
    with pytest.raises(ValueError, match="batch sizes"):
        loss(torch.zeros(4, 3), torch.zeros(3, 6), torch.zeros(4, dtype=torch.long), model)
    with pytest.raises(ValueError, match="class_identity"):
        loss(torch.zeros(4, 3), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), model)
    with pytest.raises(ValueError, match=r"class_identity \(6, 4\) should be \(6, 3\)"):  # a class too many
        loss(torch.zeros(4, 3), torch.zeros(4, 6), torch.zeros(4, dtype=torch.long),
             SimpleNamespace(**{**vars(model), "prototype_class_identity": torch.eye(6, 4)}))
    with pytest.raises(ValueError, match="expected logits"):
        loss(torch.zeros(4), torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), model)
    with pytest.raises(ValueError, match=r"batch sizes differ: 4, 4, 3"):  # the targets' count too
        loss(torch.zeros(4, 3), torch.zeros(4, 6), torch.zeros(3, dtype=torch.long), model)
    with pytest.raises(ValueError, match=r"last_layer_weight \(3, 5\) should be \(3, 6\)"):
        loss(torch.zeros(4, 3), torch.zeros(4, 6), torch.zeros(4, dtype=torch.long),
             _fake_model(weight=torch.zeros(3, 5)))


def test_max_distance_of_the_layer():
    """The loss's bound is the original's D * kh * kw for 'log' and 'linear', and 4 (= max of 2 - 2 cos) for
    'cosine', whose distances never exceed it."""
    from protokern import ProtoLayer

    assert ProtoLayer(4, 8, prototype_size=(2, 3)).max_distance == 48
    assert ProtoLayer(4, 8, similarity="linear").max_distance == 8
    layer = ProtoLayer(4, 1, similarity="cosine")
    assert layer.max_distance == 4
    _, d = layer(-torch.rand(2, 1, 3, 3))  # opposite directions: d = 4, the bound
    assert float(d.detach().max()) <= layer.max_distance
    torch.testing.assert_close(d, torch.full_like(d, 4.0))
