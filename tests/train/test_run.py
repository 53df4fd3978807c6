"""End-to-end runs on a tiny config: run-dir files, checkpoints, exact resume, interrupt handling."""

import csv
import json
import os
import re
import sys
import time

import pytest
import torch

from protokern import nearest_patches
from protokern.data import imagenet_normalize
from protokern.models import ProtoPNet
from protokern.push import PushRecords
from protokern.train import main
from protokern.train import loop as train_loop
from protokern.train.checkpoint import load_checkpoint
from protokern.train.config import TrainConfig, parse_config
from protokern.train.data import build_datasets, build_splits
from tests.train.conftest import TINY_ARGS

TRAIN_MAIN = sys.modules["protokern.train.main"]

STEPS = ["warm", "joint", "push", "last"]
TIMING = ("seconds", "images_per_s")


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _scripted_evaluations(monkeypatch, scores):
    """The trainer's evaluation with its (validation, test) accuracies replaced, step by step, by ``scores``."""
    real = TRAIN_MAIN.Trainer._evaluate
    scripted = iter(scores)

    def evaluate(self):
        row = real(self)
        row["val_accuracy"], row["test_accuracy"] = next(scripted)
        return row

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_evaluate", evaluate)


def folder_tree(root, counts: dict, test: int = 2, size: int = 24):
    """A ``--dataset folder`` tree under ``root``: ``counts[name]`` training images of each class and ``test`` test
    images each (noise with a bright square in the class's channel), named ``0.png``, ``1.png``, ..."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("test", dict.fromkeys(counts, test))):
        for c, (name, n) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                image[4:12, 4:12, c % 3] = 230
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


def folder_args(root, out, *extra) -> list[str]:
    """The tiny run's flags on the folder dataset ``root``, into ``out``, without explanations."""
    return TINY_ARGS + ["--dataset", "folder", "--data-root", str(root), "--out", str(out), "--no-explain", *extra]


def test_end_to_end_run_dir(tiny_args, tmp_path):
    summary = main(tiny_args)
    run = str(tmp_path / "run")
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    rows = _rows(run)
    assert [r["stage"] for r in rows] == STEPS
    with open(os.path.join(run, "metrics.csv")) as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["stage"] for r in csv_rows] == STEPS and "train_cluster" in csv_rows[0]
    for row, csv_row in zip(rows, csv_rows):  # the same rows: every value of metrics.jsonl has its column
        assert set(row) <= set(csv_row), set(row) - set(csv_row)
        assert all(str(value) == csv_row[key] for key, value in row.items())
    for key in ("train_accuracy", "test_accuracy", "train_ce", "train_cluster", "train_separation",
                "train_l1", "lr_add_on", "seconds", "images_per_s"):
        assert key in rows[0], key
    assert "lr_features" in rows[1] and "lr_last_layer" in rows[3]

    assert summary["complete"] and summary["test_accuracy"] == rows[-1]["test_accuracy"]
    assert 0.0 <= summary["part_localisation"] <= 1.0 and summary["part_localisation_note"] is None
    with open(os.path.join(run, "summary.json")) as fh:
        assert json.load(fh)["push_records"] == summary["push_records"]
    push_dir = os.path.join(run, "push", "epoch_001")
    records = PushRecords.load(os.path.join(push_dir, "push_records.pt"))
    assert records.pushed.all()
    assert os.path.isfile(os.path.join(push_dir, "0_overlay.png"))

    state = load_checkpoint(run)
    assert state["step"] == 3 and state["stage"] == "last" and state["push_records"] is not None
    for key in ("model", "optimizers", "scheduler", "rng", "config", "model_config"):
        assert key in state
    model = ProtoPNet.from_config(state["model_config"])
    model.load_state_dict(state["model"])
    # the last-layer stage leaves the pushed prototypes and features alone: still exact patches
    _, _, push_set, _ = build_datasets(TrainConfig(**state["config"]))
    images = torch.stack([push_set[i][0] for i in records.image_index.tolist()])
    model.eval()
    with torch.no_grad():
        d, _ = nearest_patches(model.conv_features(imagenet_normalize(images)), model.prototype_layer.prototypes)
    assert d.diagonal().max() < 1e-5
    assert load_checkpoint(os.path.join(run, "best.pt"))["best"]["pushed"]


def test_config_yaml_trains_the_same_run_again(tiny_args, tmp_path):
    main(tiny_args + ["--max-steps", "2"])
    main(["--resume", str(tmp_path / "run"), "--quiet", "--max-steps", "1"])
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "out:" not in saved and "resume:" not in saved and "max_steps:" not in saved
    again = tmp_path / "again"
    main(["--config", str(tmp_path / "run" / "config.yaml"), "--out", str(again), "--max-steps", "3"])
    assert _strip(_rows(again)) == _strip(_rows(tmp_path / "run"))


def test_resume_gives_the_same_run(tiny_args, tmp_path):
    full = tmp_path / "run"
    main(tiny_args)
    parted = tmp_path / "parted"
    args = [a if a != str(full) else str(parted) for a in tiny_args]
    first = main(args + ["--max-steps", "1"])
    assert not first["complete"] and len(_rows(parted)) == 1
    second = main(["--resume", str(parted), "--quiet", "--max-steps", "2"])  # joint, push
    assert not second["complete"] and len(_rows(parted)) == 3
    third = main(["--resume", str(parted), "--quiet"])
    assert third["complete"]
    assert _strip(_rows(parted)) == _strip(_rows(full))
    a, b = load_checkpoint(str(full))["model"], load_checkpoint(str(parted))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_saves_and_resumes(tiny_args, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = train_loop.run_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 1 (joint) training; steps: warm train+val+test, joint train ...
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(TRAIN_MAIN, "run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args)
    assert os.path.isfile(run / "interrupted.pt")
    assert load_checkpoint(str(run / "interrupted.pt"))["interrupted_during_step"] == 1
    assert load_checkpoint(str(run))["step"] == 0
    monkeypatch.setattr(TRAIN_MAIN, "run_epoch", real)
    summary = main(["--resume", str(run), "--quiet"])
    assert summary["complete"] and [r["stage"] for r in _rows(run)] == STEPS


def test_best_is_chosen_on_validation_and_both_test_accuracies_reported(tiny_args, tmp_path, capsys):
    """Default --val-fraction 0.1: one image of each class held out; best.pt has the best validation accuracy
    among the projected steps, and the summary and final line give the test accuracy of best.pt and last.pt."""
    summary = main(tiny_args + ["--last-layer-epochs", "4", "--no-quiet", "--no-explain"])
    run = str(tmp_path / "run")
    rows = _rows(run)
    assert all("val_accuracy" in r and "val_ce" in r for r in rows)
    pushed = [r for r in rows if r["stage"] in ("push", "last")]
    best = max(pushed, key=lambda r: (r["val_accuracy"], -r["step"]))  # the first best
    assert summary["selected_on"] == "validation" and summary["val_images"] == 3
    assert summary["best_step"] == best["step"] and summary["best_val_accuracy"] == best["val_accuracy"]
    assert summary["best_test_accuracy"] == best["test_accuracy"]
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    assert "no part in choosing" in summary["selection_note"]
    state = load_checkpoint(os.path.join(run, "best.pt"))
    assert state["step"] == best["step"] and state["best"]["split"] == "val"
    with open(os.path.join(run, "summary.json")) as fh:
        assert json.load(fh)["best_test_accuracy"] == best["test_accuracy"]
    with open(os.path.join(run, "metrics.csv")) as fh:
        assert [float(r["val_accuracy"]) for r in csv.DictReader(fh)] == [r["val_accuracy"] for r in rows]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"done: test accuracy last.pt {rows[-1]['test_accuracy']:.3f}, "
                           f"best.pt (step {best['step'] + 1}/{len(rows)}) {best['test_accuracy']:.3f}, "
                           f"chosen on validation accuracy {best['val_accuracy']:.3f}")


def test_held_out_images_are_not_pushed_onto(tiny_args, tmp_path):
    main(tiny_args + ["--val-fraction", "0.5", "--no-explain"])
    run = str(tmp_path / "run")
    splits = build_splits(TrainConfig.from_saved(load_checkpoint(run)["config"]))
    records = PushRecords.load(os.path.join(run, "push", "epoch_001", "push_records.pt"))
    assert len(splits.val) == 9 and len(splits.push) == 9
    sources = {splits.push.indices[i] for i in records.image_index.tolist()}
    assert sources and not sources & set(splits.val.indices)


def test_val_fraction_zero_selects_on_test(tiny_args, tmp_path, capsys):
    summary = main(tiny_args + ["--val-fraction", "0", "--last-layer-epochs", "2", "--no-quiet", "--no-explain"])
    rows = _rows(str(tmp_path / "run"))
    assert not any("val_accuracy" in r for r in rows)
    best = max((r for r in rows if r["stage"] in ("push", "last")), key=lambda r: (r["test_accuracy"], -r["step"]))
    assert summary["selected_on"] == "test" and summary["val_images"] == 0 and summary["best_val_accuracy"] is None
    assert summary["best_step"] == best["step"] and summary["best_test_accuracy"] == best["test_accuracy"]
    assert "chosen on the test set" in summary["selection_note"]
    assert "chosen on the TEST set (--val-fraction 0)" in capsys.readouterr().out.strip().splitlines()[-1]


def test_resume_keeps_the_validation_split(tiny_args, tmp_path):
    run = str(tmp_path / "run")
    main(tiny_args + ["--max-steps", "1"])
    with pytest.raises(ValueError, match="--val-fraction cannot change on resume"):
        TRAIN_MAIN.train(*parse_config(["--resume", run, "--quiet", "--val-fraction", "0.3"]))


@pytest.mark.parametrize("flags, name", [
    (["--prototype-size", "2"], "--prototype-size"), (["--similarity", "cosine"], "--similarity"),
    (["--prototype-dim", "16"], "--prototype-dim"), (["--joint-features-lr", "0.5"], "--joint-features-lr"),
])
def test_resume_refuses_a_changed_architecture_or_optimiser_setting(tiny_args, tmp_path, flags, name):
    """The saved model was built, and the saved optimiser state holds learning rates, from the run's settings:
    a resume that changes one is a one-line error naming the flag (a new learning rate would otherwise be
    silently replaced by the saved one); an unchanged value, or another spelling of it, is accepted."""
    run = str(tmp_path / "run")
    main(tiny_args + ["--max-steps", "1"])
    with pytest.raises(ValueError, match=f"{name} cannot change on resume"):
        TRAIN_MAIN.train(*parse_config(["--resume", run, "--quiet", *flags]))
    summary = TRAIN_MAIN.train(*parse_config(["--resume", run, "--quiet", "--prototype-size", "1x1",
                                              "--prototype-dim", "8", "--max-steps", "1", "--no-explain"]))
    assert summary is not None


def test_explain_hook_is_called(tiny_args, monkeypatch):
    """The trainer calls protokern.explain.explain_run once at the end, with the push records and the part
    localisation its summary computed (not computed twice)."""
    calls = []
    monkeypatch.setattr(TRAIN_MAIN, "explain_run", lambda run_dir, model, push_records=None, **kw: calls.append(
        (run_dir, push_records, kw)))
    summary = main(tiny_args)
    assert len(calls) == 1 and isinstance(calls[0][1], PushRecords)
    assert calls[0][2]["part_localisation_result"]["overall"] == summary["part_localisation"]
    assert len(calls) == 1 and isinstance(calls[0][1], PushRecords)


def test_the_done_line_is_the_last_line(tiny_args, capsys):
    """The result line comes after what the explanations print (their part localisation line came last)."""
    main(tiny_args + ["--no-quiet"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("done: test accuracy last.pt ")
    assert any(line.startswith("part localisation: ") for line in printed[:-1])


def test_ctrl_c_during_the_explanations_keeps_the_result_line(tiny_args, capsys, monkeypatch):
    """Printed after the explanations, the result line was lost when they were interrupted (also with --quiet)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TRAIN_MAIN, "explain_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args)
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    assert printed[-2].startswith("done: test accuracy last.pt ")
    assert printed[-1].startswith("interrupted during the explanations, after the last step")


def test_prune_flag_prunes_after_the_last_push(tiny_args, tmp_path):
    """--prune: after the last push, prototypes are pruned (k nearest images), the last layer retrained, and
    pruned.pt rebuilds a model whose prototype count matches prune.json."""
    from protokern.explain import model_from_checkpoint

    args = tiny_args + ["--prune", "--prune-k", "4", "--prune-threshold", "2", "--prune-retrain-epochs", "2",
                        "--no-explain"]
    main(args)
    run = tmp_path / "run"
    report = json.loads((run / "prune.json").read_text())
    assert report["num_pruned"] + report["num_remaining"] == 3 * 2
    assert report["num_remaining"] >= 1 and len(report["own_class_neighbours"]) == 6
    assert all((n < 2) == (j in report["pruned"]) for j, n in enumerate(report["own_class_neighbours"]))
    model, records, state = model_from_checkpoint(str(run / "pruned.pt"))
    assert model.num_prototypes == report["num_remaining"] == len(records.image_index)
    assert 0.0 <= report["test_accuracy"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_model"] == "pruned.pt" and summary["pruned"]["test_accuracy"] == report["test_accuracy"]
    assert summary["pruned"]["num_remaining"] == report["num_remaining"]




def test_prune_that_would_remove_everything_keeps_the_run(tiny_args, tmp_path, monkeypatch):
    import protokern.prune

    def everything(*args, **kwargs):
        raise ValueError("every prototype has fewer than 2 of its 4 nearest images in its own class")

    monkeypatch.setattr(protokern.prune, "prune_prototypes", everything)
    with pytest.warns(UserWarning, match="pruning skipped: every prototype"):
        summary = main(tiny_args + ["--prune", "--prune-k", "4", "--prune-threshold", "2", "--no-explain"])
    assert not (tmp_path / "run" / "pruned.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    assert summary["pruned"] is None and summary["final_model"] == "last.pt"


def test_prune_names_the_classes_it_leaves_without_prototypes(tmp_path, capsys):
    """A class with fewer push images than --prune-threshold can keep no prototype (its prototypes have at most
    that many own-class images among their k nearest): said at the start, then the pruning warns, prints and
    records (summary.json by name, prune.json by index) that no prototype of its own is left (the model predicts
    it only through other classes' prototypes: "never predicted" was not true)."""
    root = folder_tree(tmp_path / "data", {"a": 1, "b": 6, "c": 6})
    args = folder_args(root, tmp_path / "run", "--val-fraction", "0", "--prune", "--prune-retrain-epochs", "1",
                       "--no-quiet")
    with pytest.warns(UserWarning) as caught:
        summary = main(args)
    messages = [str(w.message) for w in caught]
    assert ("--prune: 1 of the 3 classes has fewer than --prune-threshold 3 push images (training images less the "
            "validation hold-out), so pruning will remove every prototype of theirs: a (1)") in messages
    assert any(m.startswith("pruning (k=6, threshold=3) left ") and "without prototypes of their own: 0 (a)" in m
               and m.endswith("the model predicts them only through other classes' prototypes") for m in messages)
    assert "a" in summary["pruned"]["classes_without_prototypes"]
    report = json.loads((tmp_path / "run" / "prune.json").read_text())
    assert 0 in report["classes_without_prototypes"] and report["remaining_per_class"][0] == 0
    printed = capsys.readouterr().out.splitlines()
    pruned_line = next(line for line in printed if line.startswith("pruned "))
    assert "(classes left without a prototype of their own: a" in pruned_line
    lost = len(summary["pruned"]["classes_without_prototypes"])
    assert (f"pruned.pt {summary['pruned']['test_accuracy']:.3f} (no prototype left for {lost} class"
            f"{'es' if lost > 1 else ''}), best.pt" in printed[-1])  # the done line has the final model's accuracy


def test_prune_with_every_class_too_small_says_so_at_the_start_and_at_the_end(tiny_args, tmp_path):
    """18 images, 5 per class in the push set, --prune-threshold 6: every prototype would go. The start says so
    (pruning will be skipped), and the end's "pruning skipped" blames the class sizes, not the training."""
    with pytest.warns(UserWarning) as caught:
        summary = main(tiny_args + ["--prune", "--prune-k", "6", "--prune-threshold", "6", "--no-explain"])
    messages = [str(w.message) for w in caught]
    assert re.fullmatch(r"--prune: 3 of the 3 classes have fewer than --prune-threshold 6 push images \(training "
                        r"images less the validation hold-out\), so pruning will remove every prototype of theirs: "
                        r"[\w ]+ \(5\), [\w ]+ \(5\), [\w ]+ \(5\); with every class so, pruning will be skipped",
                        messages[0])
    assert any(m.startswith("pruning skipped: every prototype has fewer than 6 of its 6 nearest") and
               "(every class has fewer than 6 images here: too small for threshold 6)" in m for m in messages)
    assert summary["pruned"] is None and summary["complete"]


def test_the_work_after_the_steps_is_announced_and_timed(tiny_args, capsys, monkeypatch):
    """Explanations, gallery and metrics took minutes at 2000 prototypes without a line in a batch log (no bars
    there), and the done line's time left them out."""
    real = TRAIN_MAIN.Trainer._explain

    def slow_explain(self):
        real(self)
        time.sleep(0.5)

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_explain", slow_explain)
    summary = main([a for a in tiny_args if a != "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("writing the explanations, the prototype gallery")]
    steps = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert len(said) == 1 and steps[-1] < said[0] < len(lines) - 1, lines
    seconds = float(re.search(r", ([0-9.]+) s -> ", lines[-1]).group(1))
    assert lines[-1].startswith("done:") and seconds >= summary["timings"]["this_session_s"] + 0.5 - 0.05


def test_a_wait_for_the_push_pictures_is_announced(tiny_args, capsys, monkeypatch):
    """The wait for a push's PNGs (48 s at 2000 prototypes) came after the step line, without a word."""
    import concurrent.futures
    import threading

    import protokern.push as push_module

    real, wait = push_module._write_images, push_module.PushRecords.wait_images
    pool, written = concurrent.futures.ThreadPoolExecutor(1), threading.Event()

    def slow(*args, **kwargs):  # the pictures still being written when the step is saved
        return [*real(*args, **kwargs), pool.submit(written.wait, 60)]

    def wait_images(self):  # they are done once waited for
        written.set()
        wait(self)

    monkeypatch.setattr(push_module, "_write_images", slow)
    monkeypatch.setattr(push_module.PushRecords, "wait_images", wait_images)
    try:
        main([a for a in tiny_args if a != "--quiet"] + ["--no-explain"])
    finally:
        written.set()
        pool.shutdown()
    out = capsys.readouterr().out
    assert out.count("  writing the push's prototype pictures to ") == 1, out


def test_a_relative_data_root_is_found_from_another_folder(tmp_path, monkeypatch):
    """A run started with a relative --data-root saves it absolute: --resume and --config RUN/config.yaml from
    another working directory read the same data (they looked for it under that directory)."""
    folder_tree(tmp_path / "project" / "data", {"a": 4, "b": 4})
    monkeypatch.chdir(tmp_path / "project")
    main(folder_args("data", tmp_path / "run", "--max-steps", "1"))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"data_root: {tmp_path / 'project' / 'data'}" in saved
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(tmp_path / "run"), "--quiet"])["complete"]
    again = main(["--config", str(tmp_path / "run" / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet",
                  "--max-steps", "1"])
    assert again["steps_done"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--prune-k", "0"], "prune_k must be an int >= 1"),
    (["--prune-threshold", "5"], r"prune_threshold must be an int in \[0, prune_k=4\]"),
    (["--prune-k", "100", "--prune-threshold", "2"], r"prune_k \(100\) > the \d+ training images"),
])
def test_prune_settings_are_checked_before_training(tiny_args, tmp_path, flags, message):
    args = tiny_args + ["--prune", "--prune-k", "4", *flags]
    with pytest.raises(ValueError, match=message):
        TRAIN_MAIN.train(*parse_config(args))
    assert not (tmp_path / "run").exists()  # refused before its directory was made


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"], ["--compile"]],
                         ids=["bf16-channels-last", "fp16", "compile"])
def test_gpu_run(tiny_args, flags):
    """The tiny run on CUDA with the trainer's speed options: it completes with finite metrics and a push."""
    args = [a if a != "cpu" else "cuda" for a in tiny_args] + flags
    summary = main(args)
    assert summary["complete"] and summary["push_records"]
    rows = _rows(args[args.index("--out") + 1])
    assert [r["stage"] for r in rows] == STEPS
    losses = [r["train_ce"] for r in rows if r.get("train_ce") is not None]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("size,similarity", [("2x3", "cosine"), ("2", "linear")])
def test_window_prototypes_and_similarity_kinds_train_end_to_end(tiny_args, tmp_path, size, similarity):
    """--prototype-size and --similarity reach the model, push and the saved model; with 'linear' the
    schedule has no last-layer epochs after a push, as the original."""
    summary = main(tiny_args + ["--prototype-size", size, "--similarity", similarity])
    run = str(tmp_path / "run")
    stages = [r["stage"] for r in _rows(run)]
    assert stages == (["warm", "joint", "push"] if similarity == "linear" else STEPS)
    assert summary["complete"]
    state = load_checkpoint(run)
    model = ProtoPNet.from_config(state["model_config"])
    model.load_state_dict(state["model"])
    kh, kw = (2, 3) if size == "2x3" else (2, 2)
    assert model.prototype_shape[2:] == (kh, kw) and model.prototype_layer.similarity == similarity
    records = PushRecords.load(os.path.join(run, "push", "epoch_001", "push_records.pt"))
    assert records.window == (kh, kw) and records.pushed.all()
    _, _, push_set, _ = build_datasets(TrainConfig(**state["config"]))
    images = torch.stack([push_set[i][0] for i in records.image_index.tolist()])
    model.eval()
    with torch.no_grad():  # the pushed prototypes are exactly windows of their source images
        d, idx = model.prototype_layer.nearest(model.conv_features(imagenet_normalize(images)))
    assert d.diagonal().max() < 1e-5
    wout = 4 - kw + 1
    assert torch.equal(idx.diagonal(), records.patch[:, 0] * wout + records.patch[:, 1])


def test_a_session_stopped_by_max_steps_says_how_to_continue(tiny_args, tmp_path, capsys):
    summary = main(tiny_args + ["--max-steps", "1", "--quiet", "--no-explain"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1  # --quiet: no per-step lines, but the last line with the command to go on
    last = printed[0]
    assert not summary["complete"]
    assert last.startswith("stopped after step 1/4 (--max-steps): test accuracy last.pt ")
    assert last.endswith(f"continue with --resume {tmp_path / 'run'}") and "done:" not in last


def test_resume_takes_every_weight_from_the_checkpoint(tiny_args, tmp_path, monkeypatch):
    """A resumed run needs neither its --backbone-weights file (moved, or a relative path from another folder)
    nor a --pretrained download: last.pt holds every weight."""
    from protokern.models import make_backbone

    weights = tmp_path / "trunk.pt"
    torch.save(make_backbone("tiny")[0].state_dict(), weights)
    run = tmp_path / "run"
    main(tiny_args + ["--backbone-weights", str(weights), "--max-steps", "1"])
    weights.unlink()
    built = []
    real = TRAIN_MAIN.ProtoPNet

    def spy(*args, **kwargs):
        built.append((kwargs["pretrained"], kwargs["backbone_weights"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(TRAIN_MAIN, "ProtoPNet", spy)
    assert not main(["--resume", str(run), "--quiet", "--max-steps", "1"])["complete"]
    assert built == [(False, None)]
    # a --pretrained run (its saved config says so): no weights download or check either
    from protokern import checkpoint as ckpt

    state = load_checkpoint(str(run / "last.pt"))
    state["config"].update(pretrained=True, backbone_weights=None)
    ckpt.save_checkpoint(state, str(run / "last.pt"))
    monkeypatch.setattr(TRAIN_MAIN, "fetch_imagenet_weights", lambda *a, **k: pytest.fail("weights fetched"))
    assert main(["--resume", str(run), "--quiet"])["complete"]
    assert built == [(False, None)] * 2


def test_a_copied_run_resumes_with_its_own_push_folder(tiny_args, tmp_path):
    import shutil

    run, copy = tmp_path / "run", tmp_path / "copy"
    main(tiny_args + ["--max-steps", "3", "--no-explain"])  # warm, joint, push
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    summary = main(["--resume", str(copy), "--quiet"])
    assert summary["complete"] and summary["push_records"] == str(copy / "push" / "epoch_001" / "push_records.pt")
    state = load_checkpoint(str(copy))
    assert state["push_records_path"] == summary["push_records"]
    assert state["push_records"]["image_dir"] == str(copy / "push" / "epoch_001")


@pytest.mark.parametrize("flags, message", [
    (["--prototype-size", "5"], r"--image-size 32 gives tiny a 4 x 4 feature map, smaller than the 5 x 5 "
                                r"prototypes \(--prototype-size\): it takes at least --image-size 40"),
    (["--backbone", "vgg11", "--image-size", "16"], r"--image-size 16 gives vgg11 a 0 x 0 feature map"),
])
def test_an_image_size_too_small_for_the_trunk_is_refused_before_anything_is_read(tiny_args, tmp_path, flags,
                                                                                   message, monkeypatch):
    monkeypatch.setattr(TRAIN_MAIN, "build_splits", lambda cfg: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match=message):
        TRAIN_MAIN.train(*parse_config(tiny_args + flags))
    assert not (tmp_path / "run").exists()


def test_more_processes_than_push_images_is_refused_before_training(tiny_args, monkeypatch):
    """A process whose push shard is empty raised alone while the others waited in the merge."""
    from protokern.train.distributed import DistInfo

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_check_out", lambda self: None)  # collective: no process group here
    cfg, explicit = parse_config(tiny_args)
    with pytest.raises(ValueError, match=r"^\d+ push images for 64 processes: each needs at least one$"):
        TRAIN_MAIN.Trainer(cfg, DistInfo(0, 64, 0), torch.device("cpu"), explicit)


@pytest.mark.parametrize("k, threshold, refused, warned", [
    (15, 5, False, False),  # prune_k = the whole push set (15 images) is allowed
    (16, 5, True, False),   # one more is refused
    (5, 5, False, False),   # every class has exactly --prune-threshold push images: each may keep a prototype
    (6, 6, False, True),    # one fewer than --prune-threshold: said at the start
])
def test_the_trainers_early_prune_checks_at_their_edges(tiny_args, k, threshold, refused, warned):
    """The push set of the tiny run holds 15 images, 5 a class: its edges, checked before any training."""
    import warnings

    from protokern.train.distributed import DistInfo

    cfg, explicit = parse_config(tiny_args + ["--prune", "--prune-k", str(k), "--prune-threshold", str(threshold)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if refused:
            with pytest.raises(ValueError, match=rf"^bad config: prune_k \({k}\) > the 15 training images that "
                                                 r"pruning looks among$"):
                TRAIN_MAIN.Trainer(cfg, DistInfo(0, 1, 0), torch.device("cpu"), explicit)
            return
        trainer = TRAIN_MAIN.Trainer(cfg, DistInfo(0, 1, 0), torch.device("cpu"), explicit)
    assert len(trainer.push_set) == 15
    early = [str(w.message) for w in caught if str(w.message).startswith("--prune:")]
    assert bool(early) == warned, early


def test_as_many_processes_as_push_images_is_accepted(tiny_args, monkeypatch):
    """The edge of the check above: one push image a process is enough."""
    from protokern.train.distributed import DistInfo

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_check_out", lambda self: None)  # collective: no process group here
    cfg, explicit = parse_config(tiny_args + ["--train-batch-size", "15"])  # the global batch divides evenly
    trainer = TRAIN_MAIN.Trainer(cfg, DistInfo(0, 15, 0), torch.device("cpu"), explicit)
    assert len(trainer.push_set) == 15


def test_a_joint_step_after_a_push_never_replaces_a_pushed_best_and_only_joint_epochs_decay(tiny_args, monkeypatch):
    """Schedule warm, joint, joint, push, last, joint (--epochs 4 --push-start 2 --push-every 2): the closing joint
    step scores best but its prototypes are no longer patches, so best.pt stays the last-layer step's. StepLR
    (step 1, gamma 0.5) decays the joint learning rates once a joint epoch, never in last-layer epochs."""
    _scripted_evaluations(monkeypatch, [(0.1, 0.1), (0.2, 0.2), (0.3, 0.3), (0.5, 0.5), (0.6, 0.6), (0.9, 0.9)])
    summary = main(tiny_args + ["--epochs", "4", "--push-start", "2", "--push-every", "2", "--lr-step-size", "1",
                                "--lr-gamma", "0.5", "--no-explain"])
    rows = _rows(tiny_args[-1])
    assert [r["stage"] for r in rows] == ["warm", "joint", "joint", "push", "last", "joint"]
    assert summary["best_step"] == 4 and summary["best_val_accuracy"] == 0.6
    assert load_checkpoint(os.path.join(tiny_args[-1], "best.pt"))["step"] == 4
    joint = [r["lr_features"] for r in rows if r["stage"] == "joint"]
    assert joint[1] == joint[0] / 2 and joint[2] == joint[1] / 2, joint  # (a decay in the last step: / 4)


def test_a_session_stopped_by_max_steps_neither_prunes_nor_explains(tiny_args, monkeypatch):
    """--max-steps 3 ends after the push: pruning and the explanations belong to the finished run (a resumed
    session that completes it), not to a half-trained model."""
    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_explain", lambda self: pytest.fail("explained"))
    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_prune", lambda self: pytest.fail("pruned"))
    summary = main(tiny_args + ["--prune", "--prune-k", "4", "--prune-threshold", "1", "--max-steps", "3"])
    assert not summary["complete"] and summary["pruned"] is None and summary["final_model"] == "last.pt"
    assert not os.path.exists(os.path.join(tiny_args[-1], "pruned.pt"))


def test_a_fresh_start_over_a_run_stopped_before_its_first_checkpoint_keeps_no_old_rows(tiny_args):
    """A run killed while its first step's checkpoint was written leaves metrics rows and no last.pt: the same
    command again starts afresh and its metrics hold each step once."""
    main(tiny_args + ["--max-steps", "1", "--no-explain"])
    run = tiny_args[-1]
    for name in ("last.pt", "best.pt", "summary.json"):  # what the killed run had not written yet
        os.remove(os.path.join(run, name))
    main(tiny_args + ["--max-steps", "2", "--no-explain"])
    assert [r["step"] for r in _rows(run)] == [0, 1]
    with open(os.path.join(run, "metrics.csv")) as fh:
        assert [row["step"] for row in csv.DictReader(fh)] == ["0", "1"]


def test_the_summary_tells_last_pt_from_best_pt(tiny_args, tmp_path, monkeypatch):
    """Scripted evaluations (validation best at the push step, test accuracy falling after it): best.pt is the push
    step's model, and summary.json reports last.pt's test accuracy as test_accuracy and best.pt's apart."""
    _scripted_evaluations(monkeypatch, [(0.1, 0.2), (0.2, 0.4), (0.9, 0.8), (0.5, 0.3)])  # warm, joint, push, last
    summary = main(tiny_args + ["--no-explain"])
    assert summary["best_step"] == 2 and summary["selected_on"] == "validation"
    assert summary["best_val_accuracy"] == 0.9 and summary["best_test_accuracy"] == 0.8
    assert summary["test_accuracy"] == 0.3 and summary["final_model"] == "last.pt"
