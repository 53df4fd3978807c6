"""Configuration: presets, flags, YAML/JSON files and validation."""

import json

import pytest

from protokern.train.config import PRESETS, TrainConfig, build_parser, load_config_file, parse_config, preset_config


def test_no_arguments_is_the_demo_preset():
    cfg, explicit = parse_config([])
    assert cfg.preset == "demo" and cfg.dataset == "synthetic" and cfg.backbone == "tiny"
    assert explicit == set()


def test_cub_preset_matches_the_original():
    cfg = preset_config("cub")
    assert (cfg.backbone, cfg.image_size, cfg.prototypes_per_class, cfg.prototype_dim) == ("vgg19", 224, 10, 128)
    assert (cfg.warm_epochs, cfg.push_start, cfg.push_every, cfg.last_layer_iters) == (5, 10, 10, 20)
    assert (cfg.train_batch_size, cfg.test_batch_size, cfg.push_batch_size) == (80, 100, 75)
    assert (cfg.warm_add_on_lr, cfg.warm_prototypes_lr) == (3e-3, 3e-3)
    assert (cfg.joint_features_lr, cfg.joint_add_on_lr, cfg.joint_prototypes_lr) == (1e-4, 3e-3, 3e-3)
    assert (cfg.weight_decay, cfg.lr_step_size, cfg.lr_gamma, cfg.last_layer_lr) == (1e-3, 5, 0.1, 1e-4)
    assert (cfg.ce_coef, cfg.cluster_coef, cfg.separation_coef, cfg.l1_coef) == (1.0, 0.8, -0.08, 1e-4)
    assert cfg.pretrained and cfg.add_on == "regular"


def test_every_preset_is_valid():
    for name in PRESETS:
        cfg = preset_config(name)
        if cfg.dataset != "synthetic":
            cfg.data_root = "/data"
        cfg.validate()


def test_flags_override_file_override_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: demo\nepochs: 7\nwarm-epochs: 2\njoint_features_lr: 1e-5\n")
    cfg, explicit = parse_config(["--config", str(path), "--epochs", "9", "--no-push-images", "--amp", "bf16"])
    assert cfg.epochs == 9 and cfg.warm_epochs == 2 and cfg.joint_features_lr == 1e-5
    assert cfg.push_images is False and cfg.amp == "bf16" and cfg.backbone == "tiny"
    assert {"epochs", "warm_epochs", "push_images", "amp"} <= explicit


def test_json_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "cub", "data_root": "/x", "seed": 4}))
    cfg, _ = parse_config(["--config", str(path)])
    assert cfg.preset == "cub" and cfg.seed == 4 and cfg.backbone == "vgg19"


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown settings \\['epochz'\\]"):
        load_config_file(str(bad))
    bad.write_text("epochs: three\n")
    with pytest.raises(ValueError, match="epochs must be int"):
        load_config_file(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config_file(str(bad))
    with pytest.raises(FileNotFoundError):
        load_config_file(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cub"], "needs --data-root"),
    (["--epochs", "0"], "epochs must be an int >= 1"),
    (["--warm-epochs", "9", "--epochs", "3"], "warm_epochs"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
])
def test_bad_values_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_bad_choice_exits_with_usage():
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "mnist"])


def test_every_field_has_a_flag():
    text = build_parser().format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
