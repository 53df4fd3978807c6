"""``python -m protokern.explain``: the default output folder never replaces the trainer's or an earlier
explanation, a missing --data-root is an error, and --help is plain text."""

import json
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from protokern.checkpoint import load_checkpoint, save_checkpoint
from protokern.explain.__main__ import _push_dataset, main as cli
from protokern.train import main as train_main

from tests.fake_trees import png_header_only

from .test_run import ARGS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny training run, with the trainer's explanations/test_NNNNN folders."""
    out = tmp_path_factory.mktemp("run")
    train_main(ARGS + ["--out", str(out)])
    return out


def _image(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def test_default_out_keeps_the_trainers_explanations(run_dir, tmp_path, capsys):
    trainer = run_dir / "explanations" / "test_00000"
    before = {name: _read(trainer / name) for name in os.listdir(trainer)}
    index = _read(run_dir / "explanations" / "index.html")
    page = cli(["--checkpoint", str(run_dir), "--image", _image(tmp_path / "test_00000.png"), "--top-k", "2"])
    assert page == os.path.join(str(run_dir), "explanations", "image_test_00000", "index.html")
    assert os.path.isfile(page)
    assert {name: _read(trainer / name) for name in os.listdir(trainer)} == before  # not replaced
    assert _read(run_dir / "explanations" / "index.html") == index
    assert capsys.readouterr().out.rstrip().endswith(f"-> {page}")  # the folder written is printed


def test_default_out_never_replaces_an_earlier_explanation(run_dir, tmp_path):
    first = cli(["--checkpoint", str(run_dir / "best.pt"), "--image", _image(tmp_path / "a" / "1.png", 1)])
    written = _read(os.path.join(os.path.dirname(first), "explanation.json"))
    second = cli(["--checkpoint", str(run_dir / "best.pt"), "--image", _image(tmp_path / "b" / "1.png", 2)])
    third = cli(["--checkpoint", str(run_dir / "best.pt"), "--image", str(tmp_path / "a" / "1.png")])
    folders = [os.path.relpath(os.path.dirname(p), run_dir / "explanations") for p in (first, second, third)]
    assert folders == ["image_1", "image_1-1", "image_1-2"]
    assert _read(os.path.join(os.path.dirname(first), "explanation.json")) == written
    assert all(os.path.isfile(p) for p in (first, second, third))


def test_explicit_out_is_written_even_if_it_holds_an_explanation(run_dir, tmp_path):
    out = run_dir / "explanations" / "test_00001"  # the user asked for it
    before = _read(out / "explanation.json")
    page = cli(["--checkpoint", str(run_dir), "--image", _image(tmp_path / "x.png", 3), "--out", str(out)])
    assert page == str(out / "index.html") and _read(out / "explanation.json") != before


def test_missing_data_root_is_a_one_line_error(run_dir, tmp_path, capsys):
    missing = str(tmp_path / "birdz-typo")
    with pytest.raises(SystemExit) as stop:
        cli(["--checkpoint", str(run_dir), "--image", _image(tmp_path / "x.png"), "--data-root", missing])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m protokern.explain: error: --data-root {missing}: "
                                                   "no such folder")
    state = load_checkpoint(str(run_dir / "best.pt"))
    with pytest.raises(ValueError, match="no such folder"):
        _push_dataset(dict(state, config=dict(state["config"], dataset="folder", data_root=str(tmp_path))), missing)
    assert _push_dataset(state, str(tmp_path)) is not None  # an existing folder is fine (synthetic: unused)


def test_a_checkpoints_saved_config_does_not_decide_what_explain_renders(run_dir):
    """The push set was rebuilt from the checkpoint's training config unvalidated: its synthetic sizes made
    explaining one image render 40,000 images (13 GB). Too large or invalid: the push PNGs are used instead."""
    state = load_checkpoint(str(run_dir / "best.pt"))
    assert state["config"]["dataset"] == "synthetic" and _push_dataset(state, None) is not None
    huge = dict(state, config=dict(state["config"], synthetic_train_per_class=40_000, image_size=128))
    with pytest.warns(UserWarning, match=r"push set not rebuilt \(the synthetic images would take \d+\.\d GiB\); using "
                                         r"the prototype images saved by push"):
        assert _push_dataset(huge, None) is None
    many = dict(state, config=dict(state["config"], epochs=10 ** 9, push_start=10 ** 9))  # no schedule built
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nor the trainer's advice on a schedule without a push)
        assert _push_dataset(many, None) is not None
    bad = dict(state, config=dict(state["config"], synthetic_classes=-3))
    with pytest.warns(UserWarning, match=r"push set not rebuilt \(saved config unusable: .*synthetic_classes"):
        assert _push_dataset(bad, None) is None


def test_the_cli_prints_class_names_without_control_characters(run_dir, tmp_path, capsys, monkeypatch):
    from protokern.explain.local import Explanation

    monkeypatch.setattr(Explanation, "class_name", lambda self, c: f"\x1b[2Jclass{c}\x07")
    cli(["--checkpoint", str(run_dir), "--image", _image(tmp_path / "x.png"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "(class \\x1b[2Jclass0\\x07)" in out


def test_class_names_come_from_the_checkpoint_when_the_dataset_is_gone(run_dir, tmp_path, capsys):
    """A folder dataset moved since training: the explanation named classes by index ("class 1")."""
    state = load_checkpoint(str(run_dir / "best.pt"))
    state["config"] = dict(state["config"], dataset="folder", data_root=str(tmp_path / "moved away"))
    save_checkpoint(state, str(tmp_path / "moved.pt"))
    cli(["--checkpoint", str(tmp_path / "moved.pt"), "--image", _image(tmp_path / "x.png"), "--out",
         str(tmp_path / "out")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split(" (logit")[0].removeprefix("class ") in state["data"]["classes"], first


def test_an_exif_orientation_is_said_to_be_left_unapplied(run_dir, tmp_path, capsys):
    """A phone photo (EXIF orientation 6) was explained sideways without a word."""
    plain = _image(tmp_path / "plain.jpg")
    turned = str(tmp_path / "turned.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(plain).save(turned, exif=exif)
    exif[0x0112] = 9  # not an orientation: nothing to say
    Image.open(plain).save(str(tmp_path / "odd.jpg"), exif=exif)
    for image, noted in ((plain, False), (turned, True), (str(tmp_path / "odd.jpg"), False)):
        cli(["--checkpoint", str(run_dir), "--image", image, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert ("EXIF orientation tag (6: photo viewers show it turned or mirrored) is not applied" in err) == noted
    for tag in (1, 2, 8):  # 1: upright, as every camera writes it (nothing to say); 2..8 turn or mirror
        exif[0x0112] = tag
        Image.open(plain).save(turned, exif=exif)
        cli(["--checkpoint", str(run_dir), "--image", turned, "--out", str(tmp_path / "out")])
        assert ("EXIF orientation tag" in capsys.readouterr().err) == (tag != 1), tag


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--class", "3"], r"--class must be in \[0, 3\)"),
    (["--class", "-1"], r"--class must be in \[0, 3\)"),
])
def test_bad_top_k_and_class_are_refused_by_the_command_line(run_dir, tmp_path, capsys, flags, message):
    """Said as the command line's own usage error (exit 2): --top-k before the checkpoint is read."""
    with pytest.raises(SystemExit) as stop:
        cli(["--checkpoint", str(run_dir), "--image", _image(tmp_path / "a.png"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and re.search(f"error: {message}$", err.strip()), err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "``" not in printed and "index.html" in printed and "image_<image name>" in printed


def _sized_image(path, height, width):
    Image.fromarray((np.random.default_rng(4).random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _explained(page):
    with open(os.path.join(os.path.dirname(page), "explanation.json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_image_size_is_said_and_can_be_the_images_own(run_dir, tmp_path, capsys):
    """A non-square image was resized to the training images' square size without a word (its boxes and logits
    were of a distorted copy); the default still matches the training images' resize, and says so."""
    side = load_checkpoint(str(run_dir / "best.pt"))["push_records"]["image_size"][0]
    wide = _sized_image(tmp_path / "wide.png", 40, 72)
    record = _explained(cli(["--checkpoint", str(run_dir), "--image", wide, "--out", str(tmp_path / "auto")]))
    assert record["image_size"] == [side, side] and "y0, y1, x0, x1" in record["box_format"]
    note = capsys.readouterr().err.strip().splitlines()
    assert note == [f"note: the 40 x 72 image (height x width) is explained resized to {side} x {side}, the training "
                    "images' size (they were resized so); --image-size native explains it at its own size"]
    native = cli(["--checkpoint", str(run_dir), "--image", wide, "--image-size", "native",
                  "--out", str(tmp_path / "n")])
    assert _explained(native)["image_size"] == [40, 72] and capsys.readouterr().err == ""
    assert all(e["box"][1] <= 40 and e["box"][3] <= 72 for e in _explained(native)["top"])
    given = cli(["--checkpoint", str(run_dir), "--image", wide, "--image-size", "48x56", "--out", str(tmp_path / "g")])
    assert _explained(given)["image_size"] == [48, 56]
    square = _sized_image(tmp_path / "square.png", 50, 50)
    cli(["--checkpoint", str(run_dir), "--image", square, "--out", str(tmp_path / "s")])
    assert capsys.readouterr().err == ""  # same shape: nothing to say
    with pytest.raises(SystemExit) as stop:
        cli(["--checkpoint", str(run_dir), "--image", wide, "--image-size", "0x5"])
    assert stop.value.code == 2 and "expected auto, native, a side N or HxW" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # no allocation of an image larger than any file may be
        cli(["--checkpoint", str(run_dir), "--image", wide, "--image-size", "20000"])
    assert stop.value.code == 2 and "is more than the 89478485 pixels" in capsys.readouterr().err


def test_auto_size_of_a_checkpoint_never_pushed_is_its_training_size(run_dir, tmp_path, capsys):
    """Without push records the size comes from the checkpoint's config (the image's own size was used)."""
    state = load_checkpoint(str(run_dir / "best.pt"))
    side = state["config"]["image_size"]
    state["push_records"] = None
    save_checkpoint(state, str(tmp_path / "unpushed.pt"))
    wide = _sized_image(tmp_path / "wide.png", 40, 72)
    page = cli(["--checkpoint", str(tmp_path / "unpushed.pt"), "--image", wide, "--out", str(tmp_path / "out")])
    assert _explained(page)["image_size"] == [side, side]
    assert f"explained resized to {side} x {side}" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["auto", "native"])
@pytest.mark.parametrize("side", [10000, 20000])  # PIL warns at the first, raises at the second
def test_a_decompression_bomb_is_one_line(run_dir, tmp_path, capsys, side, mode):
    """The CLI's read of the image's size met PIL's limit first: a traceback (or PIL's warning) instead of the
    loader's one-line refusal."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    with pytest.raises(SystemExit) as stop:
        cli(["--checkpoint", str(run_dir), "--image", str(bomb), "--image-size", mode])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "decompression bomb" in err[0], err
