"""explain_run as the trainer calls it after training, and the command line on the trainer's checkpoint."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.explain import explain_run, model_from_checkpoint
from protokern.explain.__main__ import _push_dataset, main as cli
from protokern.train import main as train_main

ARGS = [
    "--preset", "demo", "--synthetic-classes", "3", "--synthetic-train-per-class", "6",
    "--synthetic-test-per-class", "4", "--image-size", "32", "--prototypes-per-class", "2",
    "--prototype-dim", "8", "--epochs", "1", "--warm-epochs", "1", "--push-start", "0", "--push-every", "1",
    "--last-layer-epochs", "1", "--train-batch-size", "8", "--test-batch-size", "8", "--push-batch-size", "8",
    "--num-workers", "0", "--quiet", "--device", "cpu", "--seed", "1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny training run; the trainer called explain_run at its end."""
    out = tmp_path_factory.mktemp("run")
    train_main(ARGS + ["--out", str(out)])
    return out


def test_trainer_calls_explain_run(run_dir):
    for name in ("explanations/index.html", "gallery/index.html", "gallery/gallery_000.png",
                 "part_localisation.json"):
        assert os.path.isfile(run_dir / name), name
    shown = sorted(d for d in os.listdir(run_dir / "explanations") if d.startswith("test_"))
    assert shown == ["test_00000", "test_00001", "test_00002"]  # first image of each of the 3 classes
    panels = [f for f in os.listdir(run_dir / "explanations" / "test_00000") if f.startswith("rank")]
    assert len(panels) == 6  # top-10 capped by the 6 prototypes
    page = np.asarray(Image.open(run_dir / "gallery" / "gallery_000.png"))
    assert page.shape[0] > 6 * 40  # one row per prototype
    data = json.load(open(run_dir / "part_localisation.json"))
    assert 0 <= data["part_localisation"] <= 1 and len(data["rf_centre"]["per_prototype"]) == 6
    summary = json.load(open(run_dir / "summary.json"))
    assert data["part_localisation"] == pytest.approx(summary["part_localisation"])  # the trainer's own metric


def test_explain_run_directly(run_dir, tmp_path):
    from protokern.train.config import TrainConfig
    from protokern.train.data import build_datasets

    model, records, state = model_from_checkpoint(str(run_dir))
    _, test, push, _ = build_datasets(TrainConfig(**state["config"]))
    result = explain_run(str(tmp_path), model, test_dataset=test, push_records=records, push_dataset=None,
                         n_images=1, top_k=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["explanations", "part_localisation.json"]  # no push set: no gallery
    assert sorted(os.listdir(tmp_path / "explanations")) == ["index.html", "test_00000"]
    assert 0 <= result["part_localisation"] <= 1
    # a push set smaller than k: the gallery shows every image (it failed, and the outputs after it were lost)
    small = torch.utils.data.Subset(push, [0, 1, 2])
    result = explain_run(str(tmp_path / "small"), model, test_dataset=test, push_records=None, push_dataset=small,
                         n_images=1, top_k=2, k=5, progress=False)
    assert os.path.isfile(result["gallery"]) and "part_localisation" in result


def test_cli_on_the_checkpoint(run_dir, tmp_path, capsys):
    image = tmp_path / "bird.png"
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red: read as RGB on white
    Image.fromarray(rgba, "RGBA").save(image)
    page = cli(["--checkpoint", str(run_dir / "best.pt"), "--image", str(image), "--top-k", "3",
                "--out", str(tmp_path / "out"), "--class", "1"])
    assert page == str(tmp_path / "out" / "index.html") and os.path.isfile(page)
    printed = capsys.readouterr().out
    assert "top prototypes" in printed and printed.count("similarity") == 3
    data = json.load(open(tmp_path / "out" / "explanation.json"))
    assert data["class_idx"] == 1 and len(data["top"]) == 3
    assert data["sum_of_contributions"] == pytest.approx(data["logit"], rel=1e-4, abs=1e-5)
    panel = Image.open(tmp_path / "out" / data["top"][0]["file"])
    assert panel.height >= 192 and panel.width > 2 * 192 + 2 * 32  # test image, 2 crops, source image
    assert data["top"][0]["source_index"] is not None
    _, _, state = model_from_checkpoint(str(run_dir / "best.pt"))
    assert _push_dataset(state, None) is not None  # the synthetic push set is rebuilt for the source images

    default = cli(["--checkpoint", str(run_dir), "--image", str(image)])  # run folder: best.pt, default out
    assert default == os.path.join(str(run_dir), "explanations", "image_bird", "index.html")

    with pytest.raises(SystemExit):
        cli(["--checkpoint", str(run_dir / "missing.pt"), "--image", str(image)])
    with pytest.raises(SystemExit):
        cli(["--checkpoint", str(run_dir / "best.pt"), "--image", str(image), "--class", "9"])
    with pytest.raises(SystemExit):
        cli(["--checkpoint", str(run_dir / "best.pt"), "--image", str(tmp_path / "nope.jpg")])


def test_model_from_checkpoint_matches_the_trained_model(run_dir):
    model, records, state = model_from_checkpoint(str(run_dir / "best.pt"))
    assert not model.training and records is not None and len(records.image_index) == model.num_prototypes
    for key, value in state["model"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_window_cosine_run_and_cli(tmp_path_factory, capsys):
    """A 2 x 3 cosine run: the trainer's explanations and gallery, and the command line on its checkpoint, show
    whole-window boxes and name the similarity."""
    from protokern.models import patch_box

    out = tmp_path_factory.mktemp("window_run")
    train_main(ARGS + ["--out", str(out), "--prototype-size", "2x3", "--similarity", "cosine"])
    gallery = json.load(open(out / "gallery" / "gallery.json"))
    assert gallery["window"] == [2, 3] and gallery["similarity"] == "cosine"
    assert os.path.isfile(out / "explanations" / "test_00000" / "index.html")
    image = out / "x.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    page = cli(["--checkpoint", str(out / "best.pt"), "--image", str(image), "--top-k", "3", "--out",
                str(tmp_path_factory.mktemp("cli"))])
    printed = capsys.readouterr().out
    assert "2 x 3 windows" in printed and printed.count("cosine similarity") == 3
    assert "cosine similarity 1 - d / 2" in open(page, encoding="utf-8").read()
    data = json.load(open(os.path.join(os.path.dirname(page), "explanation.json")))
    assert data["prototype_size"] == [2, 3] and data["similarity_kind"] == "cosine"
    model, records, _ = model_from_checkpoint(str(out / "best.pt"))
    H, W = records.feature_size
    assert records.window == (2, 3)
    for top in data["top"]:
        h, w = top["patch"]
        assert 0 <= h < H - 1 and 0 <= w < W - 2  # a window position
        assert top["rf_box"] == list(patch_box(model.receptive_field, 32, h, w, window=(2, 3)))
        assert -1 - 1e-6 <= top["similarity"] <= 1 + 1e-6  # a cosine
        assert top["source_index"] == int(records.image_index[top["prototype"]])
