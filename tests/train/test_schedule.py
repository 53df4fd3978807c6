"""Schedule: stages, push epochs, trainable parameters, optimisers as the original."""

import torch

from protokern.models import ProtoPNet
from protokern.train.config import preset_config
from protokern.train.schedule import (build_schedule, learning_rates, make_optimizers, make_scheduler, set_trainable,
                                      step_scheduler)


def test_cub_schedule():
    cfg = preset_config("cub")
    steps = build_schedule(cfg)
    assert [s.epoch for s in steps if s.stage == "push"] == [10, 20, 30]
    assert [s.stage for s in steps[:5]] == ["warm"] * 5 and steps[5].stage == "joint"
    assert sum(s.stage == "last" for s in steps) == 60
    assert sum(s.stage in ("warm", "joint") for s in steps) == cfg.epochs
    after = steps.index(next(s for s in steps if s.stage == "push"))
    assert [s.stage for s in steps[after - 1:after + 22]] == ["joint", "push"] + ["last"] * 20 + ["joint"]
    assert [s.index for s in steps] == list(range(len(steps)))


def test_push_at_end():
    cfg = preset_config("cub")
    cfg.epochs = 15
    assert [s.epoch for s in build_schedule(cfg) if s.stage == "push"] == [10]  # the original: no final push
    cfg.push_at_end = True
    pushes = [s.epoch for s in build_schedule(cfg) if s.stage == "push"]
    assert pushes == [10, 14]
    cfg.push_at_end = False
    assert [s.epoch for s in build_schedule(cfg) if s.stage == "push"] == [10]


def test_trainable_parameters_and_optimisers():
    cfg = preset_config("cub")
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8)
    trainable = lambda part: {p.requires_grad for p in getattr(model, part).parameters()}  # noqa: E731
    set_trainable(model, "warm")
    assert trainable("features") == {False} and trainable("add_on") == {True}
    assert trainable("prototype_layer") == {True} and trainable("last_layer") == {False}
    set_trainable(model, "joint")
    assert trainable("features") == {True} and trainable("last_layer") == {False}
    set_trainable(model, "last")
    assert trainable("features") == trainable("add_on") == trainable("prototype_layer") == {False}
    assert trainable("last_layer") == {True}

    opts = make_optimizers(model, cfg)
    groups = {k: {g["name"]: (g["lr"], g["weight_decay"]) for g in o.param_groups} for k, o in opts.items()}
    assert groups["warm"] == {"add_on": (3e-3, 1e-3), "prototypes": (3e-3, 0)}
    assert groups["joint"] == {"features": (1e-4, 1e-3), "add_on": (3e-3, 1e-3), "prototypes": (3e-3, 0)}
    assert groups["last"] == {"last_layer": (1e-4, 0)}
    last = model.last_layer.weight
    assert all(p is not last for k in ("warm", "joint") for g in opts[k].param_groups for p in g["params"])


def test_step_lr_stepped_before_each_joint_epoch_as_the_original():
    cfg = preset_config("cub")
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8)
    joint = make_optimizers(model, cfg)["joint"]
    scheduler = make_scheduler(joint, cfg)
    lrs = []
    for _ in range(11):
        step_scheduler(scheduler)
        lrs.append(joint.param_groups[0]["lr"])
    assert lrs[:4] == [1e-4] * 4 and abs(lrs[4] - 1e-5) < 1e-12 and abs(lrs[9] - 1e-6) < 1e-12


def test_every_rate_setting_reaches_its_group():
    """Each learning rate, the weight decay and the step size / gamma of the scheduler land where they belong
    (the presets share values between settings, so a swapped one went unseen)."""
    cfg = preset_config("cub")
    cfg.warm_add_on_lr, cfg.warm_prototypes_lr, cfg.joint_features_lr = 1.0, 2.0, 3.0
    cfg.joint_add_on_lr, cfg.joint_prototypes_lr, cfg.last_layer_lr, cfg.weight_decay = 4.0, 5.0, 6.0, 0.5
    cfg.lr_step_size, cfg.lr_gamma = 2, 0.25
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8)
    opts = make_optimizers(model, cfg)
    groups = {k: {g["name"]: (g["lr"], g["weight_decay"]) for g in o.param_groups} for k, o in opts.items()}
    assert groups == {"warm": {"add_on": (1.0, 0.5), "prototypes": (2.0, 0)},
                      "joint": {"features": (3.0, 0.5), "add_on": (4.0, 0.5), "prototypes": (5.0, 0)},
                      "last": {"last_layer": (6.0, 0)}}
    scheduler = make_scheduler(opts["joint"], cfg)
    lrs = []
    for _ in range(5):
        step_scheduler(scheduler)
        lrs.append([g["lr"] for g in opts["joint"].param_groups])
    assert lrs == [[3.0, 4.0, 5.0]] + [[0.75, 1.0, 1.25]] * 2 + [[0.1875, 0.25, 0.3125]] * 2


def test_last_layer_steps_are_numbered_after_each_push():
    """After every push the last-layer steps carry iteration 0..last_layer_epochs-1 (their epoch number, in the
    logs and the resumed step), at the push's epoch; other steps have iteration 0."""
    cfg = preset_config("cub")
    steps = build_schedule(cfg)
    for push in (s for s in steps if s.stage == "push"):
        last = steps[push.index + 1:push.index + 1 + cfg.last_layer_epochs]
        assert [s.iteration for s in last] == list(range(cfg.last_layer_epochs))
        assert {s.stage for s in last} == {"last"} and {s.epoch for s in last} == {push.epoch}
    assert all(s.iteration == 0 for s in steps if s.stage != "last")


def test_learning_rates_are_keyed_by_group_name():
    """{'lr_<group name>': lr} (the metrics.csv columns), falling back to the group's position only for an
    unnamed group."""
    cfg = preset_config("cub")
    model = ProtoPNet("tiny", num_classes=3, prototypes_per_class=2, prototype_dim=8)
    opts = make_optimizers(model, cfg)
    assert learning_rates(opts["joint"]) == {"lr_features": 1e-4, "lr_add_on": 3e-3, "lr_prototypes": 3e-3}
    assert learning_rates(opts["last"]) == {"lr_last_layer": 1e-4}
    unnamed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    assert learning_rates(unnamed) == {"lr_0": 0.5}
