"""Section 6 of issue 13: bad command-line input of ``python -m protokern.train`` and ``python -m
protokern.explain`` ends with one line on stderr and exit code 2 (``--debug``: the traceback); explain warns
about never-pushed prototypes and clears the stale panels of a reused --out."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.checkpoint import CheckpointError
from protokern.cli import exit_on_error, worker_message
from protokern.explain.__main__ import main as explain
from protokern.train import main as train

from .conftest import run_args, stderr_line


def _bad_checkpoint(kind: str, run, folder) -> str:
    """A bad checkpoint file of ``kind`` made from the finished run ``run``."""
    path = os.path.join(folder, f"{kind}.pt")
    if kind == "missing":
        return path
    good = (run / "last.pt").read_bytes()
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        open(path, "wb").write(good[: len(good) // 2])
    elif kind == "text":
        open(path, "w").write("not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    else:
        state = torch.load(run / "last.pt", weights_only=True)
        if kind == "pruned":
            state.update(stage="prune")
            del state["optimizers"], state["scheduler"]
        elif kind == "model-config":  # weights of another architecture than the saved config says
            state["model_config"]["prototype_dim"] = 16
        torch.save(state, path)
    return path


EXPECTED = {"missing": "no checkpoint at", "empty": "is empty", "truncated": "not a readable checkpoint",
            "text": "neither torch.save's zip nor its pickle format", "tensor": "not a protokern training checkpoint",
            "pruned": "cannot be resumed", "model-config": "do not fit the saved model config"}


def _image(folder) -> str:
    path = os.path.join(folder, "bird.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path)
    return path


def _exit_code(call, *args):
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    return exit_info.value.code


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "tensor", "pruned"])
def test_train_resume_from_a_bad_checkpoint(finished_run, tmp_path, capsys, kind):
    path = _bad_checkpoint(kind, finished_run, str(tmp_path))
    assert _exit_code(train, ["--resume", path, "--quiet"]) == 2
    assert EXPECTED[kind] in stderr_line(capsys)


def test_train_resume_with_a_different_config(run_copy, capsys):
    assert _exit_code(train, ["--resume", str(run_copy), "--quiet", "--prototype-dim", "16"]) == 2
    line = stderr_line(capsys)
    assert "--prototype-dim cannot change on resume" in line and "(the run used 8)" in line


CONFIGS = {"broken.yaml": ("lr: [1, 2\n", "not valid YAML"), "broken.json": ('{"epochs": ', "not a JSON text file"),
           "list.yaml": ("- 1\n- 2\n", "must hold a mapping"), "unknown.yaml": ("learning_rate: 1\n", "unknown settings"),
           "binary.yaml": (b"\xff\xfe\x00garbage", "not a YAML text file"), "missing.yaml": (None, "not found")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_bad_config_file(tmp_path, capsys, name):
    text, expected = CONFIGS[name]
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    assert _exit_code(train, ["--config", str(path)]) == 2
    assert expected in stderr_line(capsys)


@pytest.mark.parametrize("dataset", ["folder", "cub", "cars"])
def test_train_bad_data_path(tmp_path, capsys, dataset):
    args = run_args(tmp_path / "run", "--dataset", dataset, "--data-root", str(tmp_path / "nowhere"))
    assert _exit_code(train, args) == 2
    assert "nowhere" in stderr_line(capsys)


def _absent_devices() -> list[str]:
    """Device names torch knows but this machine lacks, and one torch does not know."""
    absent = ["gpu0"]  # (not "gpu": a test id holding it counts as gpu-marked)
    absent += ["cuda", "cuda:0"] if not torch.cuda.is_available() else [f"cuda:{torch.cuda.device_count()}"]
    if not torch.backends.mps.is_available():
        absent.append("mps")
    return absent


@pytest.mark.parametrize("device", _absent_devices())
def test_a_device_this_machine_lacks_is_one_line(finished_run, tmp_path, capsys, device):
    assert _exit_code(train, run_args(tmp_path / "run", "--device", device)) == 2
    assert "device" in stderr_line(capsys) and not (tmp_path / "run" / "last.pt").exists()
    assert _exit_code(explain, ["--checkpoint", str(finished_run), "--image", _image(str(tmp_path)), "--device",
                                device]) == 2
    assert "device" in stderr_line(capsys)


def test_debug_keeps_the_traceback(finished_run, tmp_path):
    with pytest.raises(CheckpointError, match="is empty"):
        train(["--resume", _bad_checkpoint("empty", finished_run, str(tmp_path)), "--debug"])
    with pytest.raises(CheckpointError, match="is empty"):
        explain(["--checkpoint", _bad_checkpoint("empty", finished_run, str(tmp_path)), "--image",
                 _image(str(tmp_path)), "--debug"])


def test_debug_from_a_config_file_and_the_last_flag_wins(finished_run, tmp_path, capsys):
    empty = _bad_checkpoint("empty", finished_run, str(tmp_path))
    config = tmp_path / "debug.yaml"
    config.write_text("debug: true\n")
    with pytest.raises(CheckpointError, match="is empty"):
        train(["--config", str(config), "--resume", empty])
    assert _exit_code(train, ["--resume", empty, "--debug", "--no-debug"]) == 2
    assert "is empty" in stderr_line(capsys)


def test_a_gpu_data_cache_on_a_cpu_run_is_one_line(tmp_path, capsys):
    """--data-cache gpu on a CPU run was accepted without a word (the synthetic set never reaches the cache)."""
    assert _exit_code(train, run_args(tmp_path / "run", "--data-cache", "gpu")) == 2
    assert "--data-cache gpu keeps the images on the training GPU; this run trains on cpu" in stderr_line(capsys)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "tensor", "model-config"])
def test_explain_bad_checkpoint(finished_run, tmp_path, capsys, kind):
    path = _bad_checkpoint(kind, finished_run, str(tmp_path))
    assert _exit_code(explain, ["--checkpoint", path, "--image", _image(str(tmp_path))]) == 2
    assert EXPECTED[kind] in stderr_line(capsys)


@pytest.mark.parametrize("kind, said", [("folder", "is a folder: give one image file"),
                                         ("broken link", "is a broken symbolic link (to /nowhere/x.jpg, which leads "
                                                         "to no file)"),
                                         ("missing", "image not found:")])
def test_explain_says_why_an_image_cannot_be_read(tmp_path, capsys, kind, said):
    """A folder or a broken link given as --image said "image not found" (ls shows it)."""
    image = tmp_path / "photo.jpg"
    if kind == "folder":
        image.mkdir()
    elif kind == "broken link":
        image.symlink_to("/nowhere/x.jpg")
    assert _exit_code(explain, ["--checkpoint", str(tmp_path / "unread.pt"), "--image", str(image)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and said in lines[0], lines


def test_explain_warns_when_prototypes_were_never_pushed(tmp_path, capsys):
    run = tmp_path / "run"
    train(run_args(run, "--max-steps", "1"))  # warm-up only: no push yet
    capsys.readouterr()
    page = explain(["--checkpoint", str(run / "last.pt"), "--image", _image(str(tmp_path)), "--top-k", "2",
                    "--out", str(tmp_path / "out")])
    assert os.path.isfile(page)
    printed = capsys.readouterr()
    assert "were never pushed" in printed.err
    first = printed.out.splitlines()[0]  # class names from the rebuilt dataset, also without push records
    assert first.startswith("class ") and not first.split(" (logit")[0].removeprefix("class ").isdigit(), first


def test_explain_clears_stale_panels_of_a_reused_out(finished_run, tmp_path, capsys):
    out, image = tmp_path / "out", _image(str(tmp_path))
    explain(["--checkpoint", str(finished_run / "best.pt"), "--image", image, "--top-k", "3", "--out", str(out)])
    assert len([n for n in os.listdir(out) if n.startswith("rank")]) == 3
    (out / "my_notes.png").write_bytes(b"keep me")
    explain(["--checkpoint", str(finished_run / "best.pt"), "--image", image, "--top-k", "1", "--out", str(out)])
    assert [n for n in os.listdir(out) if n.startswith("rank")] == [n for n in os.listdir(out)
                                                                     if n.startswith("rank01_")]
    assert len([n for n in os.listdir(out) if n.startswith("rank")]) == 1
    assert (out / "my_notes.png").read_bytes() == b"keep me"


@pytest.mark.parametrize("module", ["protokern.train", "protokern.explain"])
def test_real_process_prints_one_line_and_exits_2(tmp_path, module):
    args = (["--resume", str(tmp_path / "missing.pt")] if module == "protokern.train"
            else ["--checkpoint", str(tmp_path / "missing.pt"), "--image", _image(str(tmp_path))])
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m {module}: error: no checkpoint at")


def test_a_real_process_shows_warnings_in_one_line_each(tmp_path):
    """A CLI warning printed the library's file:line and source line around the message."""
    done = subprocess.run([sys.executable, "-m", "protokern.train", "--last-layer-iters", "2", "--resume",
                           str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    said = ("python -m protokern.train: warning: flag --last-layer-iters is deprecated (it counts epochs): use "
            "--last-layer-epochs")
    assert done.returncode == 2 and said in lines and "config.py" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "protokern.train", "--last-layer-iters", "2", "--resume",
                           str(tmp_path / "missing.pt"), "--debug"], capture_output=True, text=True, timeout=300)
    assert "DeprecationWarning: flag --last-layer-iters" in done.stderr  # --debug: Python's own form


def test_cli_warnings_keep_the_kind_and_place_of_other_packages():
    """One line each; one from outside protokern (numpy, torch) keeps its kind and place, an empty message its
    kind; Python's form comes back after the command (the subprocess test above shows them for real)."""
    from protokern.cli import exit_on_error

    ours = os.path.join(os.path.dirname(explain.__code__.co_filename), "local.py")
    with exit_on_error("prog", []):
        shown = [warnings.formatwarning(FutureWarning("old API"), FutureWarning, "/site-packages/numpy/core.py", 7),
                 warnings.formatwarning(UserWarning(""), UserWarning, ours, 3),
                 warnings.formatwarning(UserWarning("a\nb"), UserWarning, ours, 3)]
    assert shown == ["prog: warning: FutureWarning: old API (/site-packages/numpy/core.py:7)\n",
                     "prog: warning: UserWarning\n", "prog: warning: a b\n"]
    assert warnings.formatwarning("after", UserWarning, "/x/y.py", 9).startswith("/x/y.py:9: UserWarning: after")


def test_the_last_debug_flag_wins(capsys):
    """'--debug ... --no-debug' is not debug mode (one line, exit 2); '--no-debug ... --debug' is (the traceback
    is kept: the error propagates)."""
    with pytest.raises(SystemExit) as stop:
        with exit_on_error("prog", ["--debug", "x", "--no-debug"]):
            raise ValueError("bad input")
    assert stop.value.code == 2 and "prog: error: bad input" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad input"):
        with exit_on_error("prog", ["--no-debug", "x", "--debug"]):
            raise ValueError("bad input")


def test_a_worker_error_without_a_message_is_its_last_line():
    """A worker's 'Caught KeyError ...' whose traceback ends in a bare 'KeyError' (no ': message') is reported as
    that line, not as the whole multi-line traceback; a last line whose part before ': ' is not an exception
    name is reported whole."""
    message = ("Caught KeyError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "data.py", line 3, in __getitem__\n    return self.items[i]\nKeyError\n')
    assert worker_message(message) == "KeyError"
    odd = message.replace("KeyError\n", "weird line: no kind here\n")
    assert worker_message(odd) == "weird line: no kind here"
