"""Checkpoint helpers: atomic writes, RNG state round trip."""

import os
import random

import numpy as np
import pytest
import torch

from protokern.train import checkpoint as ckpt


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt.atomic_save({"v": 1}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_rng_state_round_trip_keeps_the_cached_gaussians():
    """random.gauss and NumPy's legacy normal cache the second value of a pair: an odd number of draws leaves
    one cached, and a resumed run must draw it next."""
    before = ckpt.rng_state()
    random.seed(1)
    np.random.seed(1)
    random.gauss(0, 1), np.random.standard_normal()
    state = ckpt.rng_state()
    a = (random.gauss(0, 1), np.random.standard_normal())
    ckpt.set_rng_state(state)
    assert (random.gauss(0, 1), np.random.standard_normal()) == a
    ckpt.set_rng_state(before)


def test_run_lock_release_is_idempotent(tmp_path):
    """A second release() closes nothing: the descriptor number may already be someone else's."""
    lock = ckpt.RunLock(str(tmp_path))
    lock.release()
    other = os.open(os.devnull, os.O_RDONLY)  # the lowest free number: usually the one just released
    try:
        lock.release()
        os.fstat(other)
    finally:
        os.close(other)


def test_linked_entry_looks_into_subfolders_and_raises_on_the_run_folder(tmp_path, monkeypatch):
    """A link deep in the run folder is found (push/<epoch>/...); an unreadable run folder is an error, not
    "no link"."""
    (tmp_path / "push" / "epoch-1").mkdir(parents=True)
    (tmp_path / "push" / "epoch-1" / "a.png").symlink_to("/nonexistent/elsewhere.png")
    assert ckpt.linked_entry(str(tmp_path)) == "push/epoch-1/a.png -> /nonexistent/elsewhere.png"
    scandir = os.scandir

    def refuse(path):
        if str(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(PermissionError):
        ckpt.linked_entry(str(tmp_path))


def test_find_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        ckpt.find_checkpoint(str(tmp_path))
    ckpt.atomic_save({"model": {}, "step": 0}, str(tmp_path / "last.pt"))
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not a protokern training checkpoint"):
        torch.save([1], tmp_path / "x.pt")
        ckpt.load_checkpoint(str(tmp_path / "x.pt"))


def test_explain_loads_a_model_without_importing_the_trainer(tmp_path):
    """Checkpoint files are protokern.checkpoint's and a model's loading explain's (model_from_checkpoint): explain
    and push use them, not protokern.train."""
    import subprocess
    import sys

    from protokern.models import ProtoPNet

    model = ProtoPNet(backbone="tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8, pretrained=False)
    ckpt.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 0},
                         str(tmp_path / "last.pt"))
    code = ("import sys, protokern.explain as e; m, r, s = e.model_from_checkpoint(sys.argv[1]); "
            "assert r is None and m.num_prototypes == 2; "
            "print(sorted(n for n in sys.modules if n.startswith('protokern.train')))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_model_saved_with_a_backend_this_device_lacks_loads_with_auto(tmp_path):
    from protokern.explain import model_from_checkpoint
    from protokern.models import ProtoPNet

    model = ProtoPNet(backbone="tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8, backend="cuda")
    ckpt.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "step": 0},
                         str(tmp_path / "last.pt"))
    with pytest.warns(UserWarning, match="saved with backend 'cuda', which cannot run on cpu .*: using 'auto'"):
        loaded, _, _ = model_from_checkpoint(str(tmp_path))
    assert loaded.prototype_layer.backend == "auto"
    assert loaded(torch.rand(1, 3, 32, 32))[0].shape == (1, 2)  # the forward runs (it raised before)


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("proc", [True, False], ids=["proc", "os.umask"])
def test_atomic_writes_get_the_mode_of_the_umask(tmp_path, monkeypatch, umask, proc):
    """Not mkstemp's 0600: the mode open() gives (0666 less the umask), read from /proc or through os.umask."""
    import protokern.checkpoint as base

    if not proc:
        def no_proc(*args, **kwargs):
            raise OSError("no /proc here")

        monkeypatch.setattr(base, "open", no_proc, raising=False)
    old = os.umask(umask)
    try:
        (tmp_path / "last.pt").write_bytes(b"")
        os.chmod(tmp_path / "last.pt", 0o600)
        ckpt.atomic_save({"v": 1}, str(tmp_path / "last.pt"))  # replacing a file gives it the new mode too
        ckpt.atomic_write_text(str(tmp_path / "summary.json"), "{}")
        assert os.umask(umask) == umask  # left as it was
    finally:
        os.umask(old)
    for name in ("last.pt", "summary.json"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name
