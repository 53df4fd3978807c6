"""Configuration: presets, flags, YAML/JSON files and validation."""

import dataclasses
import json
import re

import pytest

from protokern.train.config import (PRESETS, RENAMED, TrainConfig, build_parser, load_config_file, parse_config,
                                    preset_config)


def test_no_arguments_is_the_demo_preset():
    cfg, explicit = parse_config([])
    assert cfg.preset == "demo" and cfg.dataset == "synthetic" and cfg.backbone == "tiny"
    assert explicit == set()


def test_cub_preset_matches_the_original():
    cfg = preset_config("cub")
    assert (cfg.backbone, cfg.image_size, cfg.prototypes_per_class, cfg.prototype_dim) == ("vgg19", 224, 10, 128)
    assert (cfg.warm_epochs, cfg.push_start, cfg.push_every, cfg.last_layer_epochs) == (5, 10, 10, 20)
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
    (["--val-fraction", "1"], "val_fraction must be in \\[0, 1\\)"),
    (["--val-fraction", "-0.1"], "val_fraction must be in"),
    (["--last-layer-epochs", "-1"], "last_layer_epochs must be an int >= 0"),
    (["--prototype-size", "0"], "prototype_size must be K or KHxKW"),
    (["--prototype-size", "2x"], "prototype_size must be K or KHxKW"),
    (["--prototype-size", "1x2x3"], "prototype_size must be K or KHxKW"),
    # each check at its edge
    (["--warm-epochs", "4", "--epochs", "3"], r"warm_epochs \(4\) > epochs \(3\)"),
    (["--prune-k", "3", "--prune-threshold", "4"], r"prune_threshold must be an int in \[0, prune_k=3\], got 4"),
    (["--max-steps", "0"], "max_steps must be >= 1, got 0"),
    (["--joint-features-lr", "inf"], "joint_features_lr must be finite, got inf"),
    (["--lr-gamma", "nan"], "lr_gamma must be finite, got nan"),
    (["--push-start", "-1"], "push_start must be an int >= 0, got -1"),
    (["--seed", "-1"], "seed must be an int >= 0, got -1"),
    (["--lr-gamma", "-0.5"], "lr_gamma must be >= 0, got -0.5"),
    (["--lr-step-size", "0"], "lr_step_size must be an int >= 1, got 0"),
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


def test_every_field_has_its_help_in_the_parser():
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help")
        assert help_text, f"{f.name} has no help"
        assert " ".join(help_text.split()).replace("%", "%%")[:40].replace("%%", "%") in text, f.name


def test_explain_help_does_not_say_when_it_exists():
    assert "when it exists" not in TrainConfig.__dataclass_fields__["explain"].metadata["help"]


def test_val_fraction_defaults_to_a_tenth():
    assert TrainConfig().val_fraction == 0.1 and preset_config("demo").val_fraction == 0.1
    cfg, explicit = parse_config(["--val-fraction", "0"])
    assert cfg.val_fraction == 0.0 and "val_fraction" in explicit


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_old_epoch_flag_names_still_work_with_a_warning(old, new):
    flag = "--" + old.replace("_", "-")
    with pytest.warns(DeprecationWarning, match=f"{flag} is deprecated.*--{new.replace('_', '-')}"):
        cfg, explicit = parse_config([flag, "7"])
    assert getattr(cfg, new) == 7 and new in explicit and old not in explicit
    assert old not in cfg.to_dict()
    with pytest.warns(DeprecationWarning):
        assert getattr(cfg, old) == 7
    with pytest.warns(DeprecationWarning):
        setattr(cfg, old, 2)
    assert getattr(cfg, new) == 2


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_old_names_in_a_config_file(tmp_path, suffix):
    path = tmp_path / ("c" + suffix)
    path.write_text(json.dumps({"last-layer-iters": 4, "prune_retrain_iters": 9}))  # JSON is YAML too
    with pytest.warns(DeprecationWarning) as caught:
        cfg, _ = parse_config(["--config", str(path)])
    assert sorted(str(w.message).split(" setting ")[1].split()[0] for w in caught) == sorted(RENAMED)
    assert (cfg.last_layer_epochs, cfg.prune_retrain_epochs) == (4, 9)
    with pytest.warns(DeprecationWarning):  # a flag of either name still beats the file
        cfg, _ = parse_config(["--config", str(path), "--last-layer-epochs", "1"])
    assert cfg.last_layer_epochs == 1


def test_old_and_new_name_together_is_an_error():
    with pytest.raises(ValueError, match="both 'last_layer_iters' \\(deprecated\\) and 'last_layer_epochs'"):
        parse_config(["--last-layer-iters", "1", "--last-layer-epochs", "2"])


def test_saved_config_of_an_older_checkpoint():
    saved = preset_config("demo").to_dict()
    saved["last_layer_iters"] = saved.pop("last_layer_epochs")
    saved["prune_retrain_iters"] = saved.pop("prune_retrain_epochs")
    del saved["val_fraction"]  # written before the validation split: it trained on the whole training set
    with pytest.warns(DeprecationWarning) as caught:
        cfg = TrainConfig.from_saved(saved)
    assert sorted(str(w.message).split()[2] for w in caught) == sorted(RENAMED)
    assert cfg.last_layer_epochs == 3 and cfg.prune_retrain_epochs == 100 and cfg.val_fraction == 0.0
    assert TrainConfig.from_saved(preset_config("demo").to_dict()) == preset_config("demo")


def test_prototype_size_and_similarity(tmp_path):
    """--prototype-size K or KHxKW, --similarity one of the op's kinds; a config file may give K as a number;
    the trainer's schedule skips the last-layer epochs for 'linear' only."""
    from protokern.train.schedule import build_schedule

    cfg, _ = parse_config(["--prototype-size", "2x3", "--similarity", "cosine"])
    assert cfg.window == (2, 3) and cfg.similarity == "cosine"
    assert parse_config(["--prototype-size", "3"])[0].window == (3, 3)
    assert parse_config([])[0].window == (1, 1) and parse_config([])[0].similarity == "log"
    path = tmp_path / "c.yaml"
    path.write_text("prototype_size: 2\nsimilarity: linear\n")
    cfg, _ = parse_config(["--config", str(path)])
    assert cfg.window == (2, 2) and cfg.similarity == "linear"
    assert "last" not in {s.stage for s in build_schedule(cfg)}
    assert "last" in {s.stage for s in build_schedule(parse_config(["--similarity", "cosine"])[0])}
    with pytest.raises(SystemExit):
        parse_config(["--similarity", "euclid"])


def test_tilde_in_path_settings_is_expanded(tmp_path, monkeypatch):
    """"~" in a config file (no shell expands it) or a quoted flag means the home folder, not a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("data_root: ~/data\nbackbone_weights: ~/w.pt\n")
    cfg, _ = parse_config(["--config", str(path), "--out", "~/runs/x"])
    assert (cfg.out, cfg.data_root, cfg.backbone_weights) == (f"{tmp_path}/runs/x", f"{tmp_path}/data",
                                                             f"{tmp_path}/w.pt")
    cfg, _ = parse_config(["--resume", "~/runs/x"])  # not validated until merged with the run's settings
    assert cfg.resume == f"{tmp_path}/runs/x"
    assert dataclasses.replace(cfg, out="~/z").out == f"{tmp_path}/z"
    cfg = preset_config("demo")
    cfg.out = "~/set-later"
    assert cfg.validate().out == f"{tmp_path}/set-later"
    assert TrainConfig(out="a/~b").out == "a/~b"


def test_saved_paths_are_absolute_as_given(tmp_path, monkeypatch):
    """data_root and backbone_weights are saved absolute (read back from any working directory), without
    resolving "link/.." textually (it is the link target's parent); out and resume stay as given."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data_root="data", backbone_weights="w/../trunk.pt", out="runs/x", resume=None)
    assert (cfg.data_root, cfg.backbone_weights, cfg.out) == (f"{tmp_path}/data", f"{tmp_path}/w/../trunk.pt",
                                                              "runs/x")
    assert TrainConfig(data_root="/abs/link/../d").data_root == "/abs/link/../d"


def test_a_config_file_cannot_choose_where_the_run_writes(tmp_path):
    """out / resume / max_steps in a shared config file chose the run's folder (writing into an existing one)
    without any flag showing it: refused, unless the flags give them too; unset (null) ones, as config.yaml files
    before 30ec979 hold them, are taken as absent."""
    path = tmp_path / "shared.yaml"
    for text, named in (("out: /somewhere/else\n", "out is a setting of the command line only (--out), so that a "
                                                     "shared file cannot choose where a run writes: remove it from "
                                                     "the file"),
                        ("epochs: 3\nresume: r\nmax-steps: 2\n", "resume, max_steps are settings of the command line "
                                                                  "only (--resume, --max-steps), so that a shared file "
                                                                  "cannot choose where a run writes: remove them")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"config file {path}: {named}")):
            parse_config(["--config", str(path)])
    path.write_text("epochs: 3\nout: runs/old\nresume: null\nmax_steps: null\n")  # an old config.yaml
    cfg, explicit = parse_config(["--config", str(path), "--out", str(tmp_path / "new")])
    assert cfg.out == str(tmp_path / "new") and cfg.epochs == 3 and cfg.resume is None and cfg.max_steps is None
    assert "resume" not in explicit and "max_steps" not in explicit


def test_a_config_file_built_to_exhaust_memory_or_the_stack_gets_one_short_line(tmp_path):
    """A YAML alias tree ("billion laughs") echoed in the wrong-type error grew 9x per 47 bytes of file (39 MB at
    354 bytes); a deeply nested file was a RecursionError traceback."""
    levels = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]  # 9^9 leaves
    path = tmp_path / "bomb.yaml"
    path.write_text("seed:\n" + "".join(f"  {line}\n" for line in levels))
    with pytest.raises(ValueError, match=r"^bad config: seed must be int, got dict \{'a0': \[") as caught:
        parse_config(["--config", str(path)])
    assert len(str(caught.value)) < 300  # 39 MB before, at 7 levels of 9
    for name, text in (("deep.json", '{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                       ("deep.yaml", "seed: " + "[" * 100_000 + "]" * 100_000 + "\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^config file {re.escape(str(path))} is nested too deeply"):
            parse_config(["--config", str(path)])


def test_a_schedule_without_a_push(recwarn):
    """--push-start past the last epoch: --prune (it prunes after the last push) is refused, else a warning."""
    with pytest.raises(ValueError, match="--prune needs a push, but --push-start 5 .* --epochs 2") as caught:
        parse_config(["--push-start", "5", "--epochs", "2", "--prune"])
    assert "\n" not in str(caught.value)
    with pytest.warns(UserWarning, match="--push-start 5 .* --epochs 2 .* no push") as warned:
        parse_config(["--push-start", "5", "--epochs", "2"])
    assert len(warned) == 1 and "\n" not in str(warned[0].message)
    with pytest.raises(ValueError, match="--prune needs a push"):  # no epoch >= 3 that is a multiple of 4
        parse_config(["--push-start", "3", "--push-every", "4", "--epochs", "4", "--prune"])
    recwarn.clear()
    parse_config(["--push-start", "5", "--epochs", "2", "--push-at-end", "--prune"])
    parse_config(["--push-start", "1", "--push-every", "1", "--epochs", "2", "--prune"])
    parse_config([])
    for name in PRESETS:
        dataclasses.replace(preset_config(name), data_root="/data").validate()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_backbone_weights_replace_a_presets_pretrained_trunk(tmp_path):
    """--preset cub --backbone-weights FILE (the offline way to the original's trunk) was refused: "give either
    --pretrained or --backbone-weights", though only the preset asked for the download."""
    cfg, _ = parse_config(["--preset", "cub", "--data-root", str(tmp_path), "--backbone-weights", "w.pt"])
    assert cfg.pretrained is False and cfg.backbone_weights.endswith("w.pt")
    with pytest.raises(ValueError, match="give either --pretrained or --backbone-weights"):
        parse_config(["--preset", "cub", "--data-root", str(tmp_path), "--backbone-weights", "w.pt", "--pretrained"])
    saved = tmp_path / "config.yaml"  # a pretrained run's config.yaml, trained again from a local trunk file
    saved.write_text(f"preset: cub\ndata_root: {tmp_path}\npretrained: true\n")
    cfg, _ = parse_config(["--config", str(saved), "--backbone-weights", "w.pt"])
    assert cfg.pretrained is False
    saved.write_text(f"preset: cub\ndata_root: {tmp_path}\npretrained: true\nbackbone_weights: w.pt\n")
    with pytest.raises(ValueError, match="give either --pretrained or --backbone-weights"):
        parse_config(["--config", str(saved)])  # a file asking for both is still refused


@pytest.mark.parametrize("world, rank, printed", [("4", "0", True), ("4", "3", False), ("1", "3", True),
                                                  (None, "3", True)])
def test_a_usage_error_is_printed_by_rank_0_only(monkeypatch, capsys, world, rank, printed):
    """Under torchrun (WORLD_SIZE > 1) every process parses the same command line: one usage block (rank 0's),
    every process exiting with status 2. A RANK left in the environment of a single process changes nothing."""
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as stop:
        parse_config(["--epochs", "many"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert ("error: argument --epochs: invalid int value: 'many'" in err) == printed, err
    assert printed or err == ""


def test_warm_epochs_equal_to_epochs_is_accepted():
    """--warm-epochs 3 --epochs 3 (every epoch a warm-up, e.g. a quick run training add-on and prototypes only)
    is valid; only warm_epochs > epochs is refused."""
    cfg, _ = parse_config(["--warm-epochs", "3", "--epochs", "3", "--push-start", "0", "--push-every", "1"])
    assert (cfg.warm_epochs, cfg.epochs) == (3, 3)
    with pytest.raises(ValueError, match=r"warm_epochs \(4\) > epochs \(3\)"):
        parse_config(["--warm-epochs", "4", "--epochs", "3", "--push-start", "0", "--push-every", "1"])


def test_prune_threshold_equal_to_prune_k_is_accepted():
    """--prune-threshold k (prune unless all k nearest images are of the prototype's class, the strictest
    setting) is valid; only a threshold above k is refused."""
    cfg, _ = parse_config(["--prune-k", "3", "--prune-threshold", "3"])
    assert (cfg.prune_k, cfg.prune_threshold) == (3, 3)
    with pytest.raises(ValueError, match=r"prune_threshold must be an int in \[0, prune_k=3\], got 4"):
        parse_config(["--prune-k", "3", "--prune-threshold", "4"])


def test_a_config_saved_before_the_original_recipe_keeps_its_epoch_length():
    """A saved config without augment_mode (before the original's recipe) continues as it started: the composed
    augmentation, ONE copy of each image per epoch (not the new default 30, which would make each resumed epoch
    30x longer) and the cached retraining; one that has augment_mode keeps its own augment_copies."""
    old = TrainConfig.from_saved({"dataset": "synthetic", "epochs": 4})
    assert (old.augment_mode, old.augment_copies, old.prune_retrain, old.val_fraction) == ("compose", 1, "cached", 0.0)
    new = TrainConfig.from_saved({"dataset": "synthetic", "augment_mode": "original", "val_fraction": 0.1})
    assert (new.augment_copies, new.prune_retrain) == (30, "original")


def test_a_boolean_for_a_float_setting_is_refused(tmp_path):
    """'weight_decay: yes' (YAML true) is a typed error naming the setting, not a weight decay of 1.0;
    an int (1) is still a valid float."""
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: yes\n")
    with pytest.raises(ValueError, match=r"bad config: weight_decay must be float, got bool True"):
        load_config_file(str(path))
    path.write_text("weight_decay: 1\n")
    assert load_config_file(str(path)) == {"weight_decay": 1.0}


@pytest.mark.parametrize("name", ["warm_epochs", "seed", "num_workers"])
def test_a_boolean_for_an_int_setting_is_refused(tmp_path, name):
    """'<int setting>: true' in a config file is a typed error (bool is an int subclass in Python, and
    validate() does not re-check these settings for bools: warm_epochs / seed / num_workers would run as 1)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"{name}: true\n")
    with pytest.raises(ValueError, match=rf"bad config: {name} must be int, got bool True"):
        load_config_file(str(path))
