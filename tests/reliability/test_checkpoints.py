"""Section 1 of issue 13: checkpoints hold only tensors and plain values and are always loaded with
``torch.load(weights_only=True)``; a crafted pickle is refused by every loader before it can run."""

import os
import pickle
import random
import re
from collections import namedtuple

import numpy as np
import pytest
import torch

from protokern.checkpoint import (CheckpointError, atomic_save, check_safe_types, load_checkpoint, safe_load,
                                  save_checkpoint)
from protokern.explain import model_from_checkpoint
from protokern.explain.__main__ import main as explain_main
from protokern.push import RECORDS_FILE, PushRecords
from protokern.train import main as train_main
from protokern.train import checkpoint as train_ckpt

from .conftest import stderr_line


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if a loader runs pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(folder, kind: str) -> tuple[str, str]:
    """(a crafted checkpoint, the file its loading would create). ``kind``: torch.save's zip format, or a
    raw pickle (torch.load's legacy path)."""
    marker = os.path.join(folder, "pwned.txt")
    path = os.path.join(folder, f"crafted-{kind}.pt")
    payload = {"model": {}, "step": 0, "config": {}, "model_config": {}, "evil": _CreatesFile(marker)}
    if kind == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    return path, marker


def _image(folder):
    from PIL import Image

    path = os.path.join(folder, "image.png")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
    return path


LOADERS = {
    "load_checkpoint": lambda path, tmp: load_checkpoint(path),
    "model_from_checkpoint": lambda path, tmp: model_from_checkpoint(path),
    "push_records": lambda path, tmp: PushRecords.load(path),
    "train_resume": lambda path, tmp: train_main(["--resume", path, "--quiet"]),
    "explain_cli": lambda path, tmp: explain_main(["--checkpoint", path, "--image", _image(tmp),
                                                   "--out", os.path.join(tmp, "out")]),
}


@pytest.mark.parametrize("kind", ["zip", "raw-pickle"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_crafted_pickle_is_refused_by_every_loader(tmp_path, capsys, loader, kind):
    path, marker = _crafted(str(tmp_path), kind)
    if loader in ("train_resume", "explain_cli"):
        with pytest.raises(SystemExit) as exit_info:
            LOADERS[loader](path, str(tmp_path))
        assert exit_info.value.code == 2
        assert "refused to load" in stderr_line(capsys)
    else:
        culprit = r".*\(it names io\.open\)" if kind == "zip" else ""  # (a raw pickle's globals are not listed)
        with pytest.raises(CheckpointError, match="refused to load" + culprit):
            LOADERS[loader](path, str(tmp_path))
    assert not os.path.exists(marker)


def test_trainer_files_load_with_plain_weights_only(finished_run):
    """Everything the trainer writes loads with torch.load(weights_only=True) and no allowlist."""
    for name in ("last.pt", "best.pt"):
        state = torch.load(finished_run / name, weights_only=True)
        assert state["format"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
        assert isinstance(state["config"], dict) and isinstance(state["push_records"], dict)
    records = [os.path.join(d, RECORDS_FILE) for d, _, files in os.walk(finished_run) if RECORDS_FILE in files]
    assert records and all(isinstance(torch.load(p, weights_only=True), dict) for p in records)


def test_rng_state_round_trips_through_a_safe_file(tmp_path):
    state = train_ckpt.rng_state()
    check_safe_types(state)
    save_checkpoint({"model": {}, "step": 0, "rng": state}, str(tmp_path / "s.pt"))
    expected = (torch.rand(3), np.random.rand(4), random.random())
    train_ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]


def test_unsafe_values_are_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_checkpoint({"model": {}, "step": 0, "rng": {"numpy": np.zeros(3)}}, str(tmp_path / "x.pt"))
    with pytest.raises(TypeError, match="_CreatesFile"):
        save_checkpoint({"x": [1, _CreatesFile("nope")]}, str(tmp_path / "x.pt"))
    # subclasses of plain types pass isinstance but not weights_only loading: refused at save, not at load
    from collections import defaultdict

    for value, name in ((np.float64(0.5), "numpy.float64"), (np.str_("a"), "numpy.str_"),
                        (defaultdict(int), "collections.defaultdict")):
        with pytest.raises(TypeError, match=rf"checkpoint\['v'\] is a {name}"):
            save_checkpoint({"v": value}, str(tmp_path / "x.pt"))
    assert not os.listdir(tmp_path)


def test_a_trainer_config_takes_numpy_scalars_as_python_values():
    from protokern.train.config import TrainConfig

    config = TrainConfig(joint_features_lr=np.logspace(-5, -3, 3)[1], epochs=np.int64(3))
    assert type(config.joint_features_lr) is float and type(config.epochs) is int
    check_safe_types(config.to_dict())


def test_a_flipped_byte_in_a_tensor_is_a_corrupt_checkpoint(tmp_path):
    """torch.load does not check the zip's CRC-32s: a flipped byte inside tensor data loaded silently."""
    path = str(tmp_path / "c.pt")
    save_checkpoint({"w": torch.arange(100000, dtype=torch.float32), "step": 0}, path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10  # inside the 400 kB of tensor data
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: .* does not match its checksum"):
        load_checkpoint(path)
    # members stored without a CRC (torch.serialization.set_crc32_options(False)) load as torch loads them
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint({"model": {"w": torch.arange(10.0)}, "step": 1}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(path)["step"] == 1


def test_first_format_checkpoint_still_loads_and_resumes(run_copy):
    """A checkpoint of the first format (NumPy RNG state as an array, Python state as tuples) loads safely
    (only NumPy's array globals allowed) and a run resumes from it."""
    state = torch.load(run_copy / "last.pt", weights_only=True)
    np.random.seed(5)
    random.seed(5)
    state["rng"]["numpy"], state["rng"]["python"] = np.random.get_state(), random.getstate()
    del state["format"]
    torch.save(state, run_copy / "last.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(run_copy / "last.pt", weights_only=True)
    loaded = load_checkpoint(str(run_copy))
    train_ckpt.set_rng_state(loaded["rng"])
    np.random.seed(5)
    expected = np.random.rand()
    train_ckpt.set_rng_state(loaded["rng"])
    assert np.random.rand() == expected
    summary = train_main(["--resume", str(run_copy), "--quiet", "--no-explain"])
    assert summary["complete"]


def test_safe_load_explains_bad_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        safe_load(str(empty))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        safe_load(str(text))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        safe_load(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("array", [np.array([1.5, 2.5]), np.array([{"x": 1}], dtype=object)],
                         ids=["float64", "object"])
def test_numpy_arrays_beyond_the_rng_state_are_refused_in_one_line(tmp_path, array):
    path = str(tmp_path / "arrays.pt")
    torch.save({"arr": array}, path)
    with pytest.raises(CheckpointError, match="refused to load .*not a weights-only checkpoint") as info:
        safe_load(path)
    assert "\n" not in str(info.value)


def test_a_copied_run_explains_with_its_own_push_images(run_copy):
    _, records, _ = model_from_checkpoint(str(run_copy))
    assert records.image_dir.startswith(str(run_copy)) and os.path.isfile(os.path.join(records.image_dir,
                                                                                       "0_source.png"))


def test_a_model_around_a_module_trunk_comes_back_with_its_trunk(tmp_path):
    """A config cannot hold a trunk module: model_from_checkpoint takes it as backbone= (and without it says so
    instead of calling the weights unfit)."""
    from protokern.models import ProtoPNet

    def trunk():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4))

    torch.manual_seed(0)
    model = ProtoPNet(trunk(), num_classes=2, prototypes_per_class=2, prototype_dim=4, out_channels=8).eval()
    path = str(tmp_path / "model.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 0}, path)
    with pytest.raises(CheckpointError, match=r"cannot rebuild the model.*module trunk: pass backbone="):
        model_from_checkpoint(path)
    loaded, records, _ = model_from_checkpoint(path, backbone=trunk())
    x = torch.rand(2, 3, 32, 32)
    assert records is None and torch.equal(loaded(x)[0], model(x)[0])


def test_a_crafted_model_config_is_refused_before_it_allocates_or_downloads(run_copy, monkeypatch):
    """A checkpoint's model_config was built as given, then compared with the weights: num_classes edited in a
    760 KB file allocated 4 GB first (the last layer and class identity grow as classes x prototypes), and
    pretrained / backbone_weights (keys ProtoPNet.config never writes) made it download ImageNet weights or read
    a file the checkpoint named."""
    from protokern.models import ProtoPNet

    state = load_checkpoint(str(run_copy / "best.pt"))
    config, prototypes = state["model_config"], tuple(state["model"]["prototype_layer.prototypes"].shape)
    count = prototypes[0]
    built = []
    from_config = ProtoPNet.from_config
    monkeypatch.setattr(ProtoPNet, "from_config", lambda *a, **k: built.append(1) or from_config(*a, **k))
    path = str(run_copy / "edited.pt")
    save_checkpoint(dict(state, model_config=dict(config, num_classes=3000)), path)
    made = count // config["num_classes"] * 3000
    with pytest.raises(CheckpointError, match=re.escape(
            f"edited.pt: the weights do not fit the saved model config (the config makes {made} prototypes of "
            f"{prototypes[1]} channels for 3000 classes; the weights hold prototypes {prototypes} and a last layer "
            f"({config['num_classes']}, {count}))")):
        model_from_checkpoint(path)
    assert not built
    for extra in ({"pretrained": True}, {"backbone_weights": "/etc/hostname"}):
        save_checkpoint(dict(state, model_config=dict(config, **extra)), path)
        with pytest.raises(CheckpointError, match=re.escape(
                f"cannot rebuild the model from its saved config (config holds keys ProtoPNet.config never writes: "
                f"{list(extra)})")):
            model_from_checkpoint(path)
    built.clear()
    save_checkpoint(dict(state, model_config=dict(config, prototype_dim=10 ** 7)), path)  # (M, 10^7) prototypes
    with pytest.raises(CheckpointError, match=re.escape(f"the config makes {count} prototypes of 10000000 channels")):
        model_from_checkpoint(path)
    assert not built
    model, _, _ = model_from_checkpoint(str(run_copy / "best.pt"))  # the real one still loads
    assert model.num_classes == config["num_classes"]


def test_a_run_folder_is_explained_from_its_best_pt_else_its_last_pt(run_copy):
    """model_from_checkpoint(RUN) (and explain --checkpoint RUN) takes best.pt, the selected model; a folder
    without one takes last.pt."""
    best = load_checkpoint(str(run_copy / "best.pt"))["model"]["last_layer.weight"]
    last = load_checkpoint(str(run_copy / "last.pt"))
    last["model"]["last_layer.weight"] = best + 1.0  # told apart from best.pt's
    save_checkpoint(last, str(run_copy / "last.pt"))
    assert torch.equal(model_from_checkpoint(str(run_copy))[0].last_layer.weight.detach(), best)
    os.remove(run_copy / "best.pt")
    assert torch.equal(model_from_checkpoint(str(run_copy))[0].last_layer.weight.detach(), best + 1.0)


def test_checkpoint_helpers_refuse_what_they_must(tmp_path):
    """The checks under every checkpoint: a newer format (even by one) is refused with 'upgrade'; non-str / int
    keys are named before writing; +-inf counts as non-finite as NaN does."""
    from protokern.checkpoint import FORMAT, atomic_save, nonfinite_tensors

    path = str(tmp_path / "next.pt")
    atomic_save({"model": {}, "step": 0, "format": FORMAT + 1}, path)
    with pytest.raises(CheckpointError, match=rf"format {FORMAT + 1}, newer than this protokern \({FORMAT}\): upgrade"):
        load_checkpoint(path)
    atomic_save({"model": {}, "step": 0, "format": FORMAT}, path)
    assert load_checkpoint(path)["step"] == 0
    for key in ((1, 2), 1.5, None):
        with pytest.raises(TypeError, match=r"^checkpoint\['a'\]: key .* is a \w+; checkpoints take str / int keys$"):
            check_safe_types({"a": {key: 1}})
    check_safe_types({"a": {"b": 1, 2: torch.zeros(1)}})
    state = {"w": torch.tensor([1.0, float("inf")]), "v": [torch.tensor([-float("inf")]), torch.zeros(2)],
             "n": torch.tensor([float("nan")]), "i": torch.tensor([1, 2]), "ok": torch.ones(3)}
    assert nonfinite_tensors(state) == ["['w']", "['v'][0]", "['n']"]


def test_a_file_with_a_model_but_no_step_is_not_a_training_checkpoint(tmp_path):
    """{'model': ...} alone (a bare state-dict wrapper, not a trainer checkpoint) is a CheckpointError (the file
    lacks the 'model' and 'step' entries of a training checkpoint), not a checkpoint the trainer would then fail
    on (KeyError 'step') when resuming."""
    path = str(tmp_path / "model_only.pt")
    atomic_save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'model' and 'step' entries"):
        load_checkpoint(path)
    atomic_save({"model": {"w": torch.zeros(1)}, "step": 3}, path)
    assert load_checkpoint(path)["step"] == 3


Pair = namedtuple("Pair", "a b")  # module level: picklable, as a user's namedtuple is


def test_a_namedtuple_is_refused_before_it_is_written(tmp_path):
    """A namedtuple (a tuple subclass) in a state is a TypeError naming it at save time, and nothing is written:
    torch.save would write it, but weights_only loading could never read the checkpoint back."""
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a .*Pair"):
        check_safe_types({"extra": Pair(1, 2)})
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a .*Pair"):
        save_checkpoint({"model": {"w": torch.zeros(1)}, "step": 0, "extra": Pair(1, 2)}, str(path))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind
