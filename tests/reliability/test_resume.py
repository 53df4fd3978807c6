"""Section 4 of issue 13: resume cannot corrupt a run (lock, interrupted.pt, torn metrics, Ctrl-C in the
first step, orphan temporaries, atomic text files, disk full, other data)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from protokern import checkpoint as neutral
from protokern.checkpoint import CheckpointError, atomic_save, atomic_write_text, load_checkpoint, save_checkpoint
from protokern.train import main
from protokern.train.checkpoint import RunDirLocked, RunLock
from tests.train.test_run import folder_args, folder_tree

from .conftest import TRAIN_MAIN, no_temps, run_args, stderr_line


def _rows(run):
    with open(run / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture
def lock_holder(tmp_path):
    """A child process holding the lock of ``tmp_path / 'run'`` until the test ends; yields (dir, pid)."""
    run = tmp_path / "run"
    run.mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        from protokern.train.checkpoint import RunLock
        lock = RunLock({str(run)!r})
        print("locked", flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield run, child.pid
    finally:
        child.kill()
        child.wait()


def test_a_second_process_on_the_run_dir_gets_the_holders_pid(lock_holder, capsys):
    run, pid = lock_holder
    with pytest.raises(RunDirLocked, match=f"in use by process {pid}"):
        RunLock(str(run))
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(run))
    assert exit_info.value.code == 1 and f"in use by process {pid}" in stderr_line(capsys)
    assert not (run / "metrics.jsonl").exists() and not (run / "last.pt").exists()


def test_lock_of_a_dead_process_does_not_block(tmp_path):
    (tmp_path / ".lock").write_text("99999999999\n")  # longer than any PID: the file is rewritten, not overlaid
    lock = RunLock(str(tmp_path))
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    RunLock(str(tmp_path)).release()  # released: free again


def _interrupt_at(monkeypatch, call):
    real = TRAIN_MAIN.run_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(TRAIN_MAIN, "run_epoch", flaky)
    return real


def test_resume_from_interrupted_pt_is_refused_with_the_right_command(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = _interrupt_at(monkeypatch, 4)  # during the joint step's training (after warm train, val, test)
    with pytest.raises(KeyboardInterrupt):
        main(run_args(run))
    printed = capsys.readouterr().out
    assert "during step 2/4 (joint)" in printed and f"resume with --resume {run}" in printed
    monkeypatch.setattr(TRAIN_MAIN, "run_epoch", real)
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run / "interrupted.pt"), "--quiet"])
    line = stderr_line(capsys)
    assert exit_info.value.code == 2 and "mid-step state" in line and f"--resume {run}" in line
    assert main(["--resume", str(run), "--quiet", "--no-explain"])["complete"]


def test_ctrl_c_in_the_first_step_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        main(run_args(run))
    printed = capsys.readouterr().out
    assert "during step 1/4 (warm)" in printed and "nothing to resume" in printed and "--resume" not in printed
    assert not (run / "last.pt").exists()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        main(["--resume", str(run / "interrupted.pt"), "--debug"])


def test_ctrl_c_while_last_pt_is_written_names_the_step_it_holds(tmp_path, capsys, monkeypatch):
    """Interrupted while step 2's last.pt is being written: last.pt still holds step 1, so the line says the
    resume restarts at step 2 (not 3), and it does."""
    run = tmp_path / "run"
    real = TRAIN_MAIN.ckpt.save_checkpoint
    writes = {"n": 0}

    def interrupted_save(state, path, *args, **kwargs):
        if os.path.basename(path) == "last.pt":
            writes["n"] += 1
            if writes["n"] == 2:
                raise KeyboardInterrupt
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(TRAIN_MAIN.ckpt, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        main(run_args(run))
    printed = capsys.readouterr().out
    assert "during step 2/4 (joint)" in printed and "restarts at step 2/4" in printed
    assert load_checkpoint(str(run))["step"] == 0
    monkeypatch.setattr(TRAIN_MAIN.ckpt, "save_checkpoint", real)
    summary = main(["--resume", str(run), "--quiet"])
    assert summary["complete"] and [r["step"] for r in _rows(run)] == [0, 1, 2, 3]


def test_sigterm_stops_like_ctrl_c(tmp_path):
    """A scheduler's SIGTERM to the whole process group, DataLoader workers included: interrupted.pt, the resume
    line, exit status 143, no traceback; the run then resumes."""
    run = tmp_path / "run"
    args = run_args(run, "--epochs", "60", "--num-workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "protokern.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(1200):  # until the first step is saved (at most 2 minutes)
        if proc.poll() is not None or (run / "last.pt").exists():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err
    # during a step, or between two (a stop that came while a step was saved waits for the save)
    assert re.search(r"^interrupted( during step \d+/\d+ \(\w+\))?: ", out, re.M), out
    assert f"--resume {run}" in out and "restarts at step" in out
    assert (run / "interrupted.pt").exists() and (run / "last.pt").exists()
    summary = main(["--resume", str(run), "--quiet", "--max-steps", "1"])
    assert summary["steps_done"] == load_checkpoint(str(run))["step"] + 1
    assert not (run / "interrupted.pt").exists()  # its step done again: a finished run kept it (a full checkpoint)


def test_ctrl_c_while_a_step_is_saved_waits_for_the_save(tmp_path):
    """Ctrl-C takes the SIGTERM handler's road: one coming while a step's checkpoints are written waits for them
    (Python's own KeyboardInterrupt stopped the write: the step, already logged, was trained again on resume).
    A terminal's Ctrl-C goes to the whole process group: the DataLoader workers leave it to the main process."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import importlib, os, runpy, signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
        train_main = importlib.import_module("protokern.train.main")  # (the package's main is the function)
        real = train_main.ckpt.save_checkpoint
        def save(state, path):
            if path.endswith("last.pt") and not os.path.exists(path):  # the first step's save: Ctrl-C in it
                os.killpg(os.getpgrp(), signal.SIGINT)
            real(state, path)
        train_main.ckpt.save_checkpoint = save
        sys.argv = ["protokern.train"] + {run_args(run, "--num-workers", "2")!r}
        runpy.run_module("protokern.train", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert load_checkpoint(str(run))["step"] == 0 and [r["step"] for r in _rows(run)] == [0], proc.stdout
    assert f"--resume {run}" in proc.stdout and "restarts at step 2/4" in proc.stdout, proc.stdout


def test_a_background_job_keeps_ignoring_ctrl_c(tmp_path):
    """A shell starts a background job (`cmd &`, nohup) with SIGINT ignored, as Python itself then leaves it: the
    trainer's stop handler takes it over only where Ctrl-C is live."""
    script = textwrap.dedent("""
        import runpy, signal, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        import protokern.utils
        sys.argv = ["protokern.train", "--help"]
        try:
            runpy.run_module("protokern.train", run_name="__main__")
        except SystemExit:
            pass
        print(sorted(int(s) for s in protokern.utils.STOP_SIGNALS), signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().splitlines()[-1] == f"[{int(signal.SIGTERM)}] True"


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    main(run_args(run, "--max-steps", "2"))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "stage": "pu')  # killed while writing step 2's row
    with pytest.warns(UserWarning, match="dropped a partial last line"):
        summary = main(["--resume", str(run), "--quiet", "--no-explain"])
    assert summary["complete"] and [r["step"] for r in _rows(run)] == [0, 1, 2, 3]


def test_damaged_metrics_line_in_the_middle_is_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    main(run_args(run, "--max-steps", "2"))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("garbage\n" + "".join(lines))
    with pytest.raises(SystemExit):
        main(["--resume", str(run), "--quiet"])
    assert "metrics.jsonl: line 1 is not JSON" in stderr_line(capsys)


def test_orphan_temporaries_are_removed_at_the_next_start(run_copy):
    orphans = [run_copy / "last.pt.k3j2h1.tmp", run_copy / "summary.json.abc.tmp"]
    for path in orphans:
        path.write_bytes(b"partial")
    (run_copy / "mine.tmp").write_text("a user's file, not an atomic write's NAME.XXXX.tmp")
    with pytest.warns(UserWarning, match="removed 2 temporary file"):
        main(["--resume", str(run_copy), "--quiet"])
    assert not any(path.exists() for path in orphans) and (run_copy / "mine.tmp").exists()


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    main(run_args(run, "--max-steps", "1"))
    before = (run / "last.pt").read_bytes()

    def full(obj, fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(neutral.torch, "save", full)
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run), "--quiet", "--max-steps", "1"])
    line = stderr_line(capsys)
    assert exit_info.value.code == 2
    assert f"could not write {run / 'last.pt'} (disk full); the previous last.pt is intact" in line
    monkeypatch.undo()
    assert (run / "last.pt").read_bytes() == before and load_checkpoint(str(run))["step"] == 0
    assert no_temps(run)


def test_text_files_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(str(path), "old")

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="previous summary.json is intact"):
        atomic_write_text(str(path), "new")
    with pytest.raises(OSError, match="no new.pt was written"):
        atomic_save({"x": torch.ones(1)}, str(tmp_path / "new.pt"))
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_run_writes_config_and_summary_through_atomic_writes(tmp_path, monkeypatch):
    written = []
    real = TRAIN_MAIN.ckpt.atomic_write_text
    monkeypatch.setattr(TRAIN_MAIN.ckpt, "atomic_write_text", lambda p, t: (written.append(os.path.basename(p)),
                                                                             real(p, t)))
    main(run_args(tmp_path / "run", "--max-steps", "1"))
    assert {"config.yaml", "summary.json"} <= set(written)


def test_a_stop_between_best_and_last_leaves_them_consistent(tmp_path, monkeypatch):
    """best.pt is written before last.pt: a stop between the two leaves last.pt one step behind, the resume
    redoes that step, and best.pt ends as the step the summary names (never an older model)."""
    run = tmp_path / "run"
    real = TRAIN_MAIN.ckpt.save_checkpoint
    order = []

    def stopped_save(state, path, *args, **kwargs):
        name = os.path.basename(path)
        order.append((state["step"], name))
        if name == "last.pt" and state["stage"] == "push":  # the first pushed model: best.pt was just written
            raise KeyboardInterrupt
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(TRAIN_MAIN.ckpt, "save_checkpoint", stopped_save)
    with pytest.raises(KeyboardInterrupt):
        main(run_args(run))
    assert [o for o in order if o[1] != "interrupted.pt"][-2:] == [(2, "best.pt"), (2, "last.pt")]
    monkeypatch.setattr(TRAIN_MAIN.ckpt, "save_checkpoint", real)
    summary = main(["--resume", str(run), "--quiet", "--no-explain"])
    assert summary["complete"] and load_checkpoint(str(run / "best.pt"))["step"] == summary["best_step"]


@pytest.mark.parametrize("flags, message", [
    (["--push-start", "0"], r"--push-start would change steps the run has already done \(step 2 was joint epoch 1, "
                            r"it would be push epoch 0\)"),
    (["--epochs", "1", "--warm-epochs", "1"], "--epochs: the new schedule has 1 steps, but the run has already done 4"),
    # only the last step done changes (last epoch 1.0 -> joint epoch 2)
    (["--epochs", "3", "--last-layer-epochs", "0"], r"step 4 was last epoch 1\.0, it would be joint epoch 2"),
])
def test_resume_refuses_a_schedule_that_rewrites_steps_done(run_copy, flags, message):
    with pytest.raises(ValueError, match=message):
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--quiet", "--no-explain", *flags]))


def test_resuming_a_finished_run_with_its_schedule_does_nothing(run_copy):
    before = (run_copy / "last.pt").read_bytes()
    summary = TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--quiet", "--no-explain"]))
    assert summary["complete"] and summary["steps_done"] == summary["steps_total"] == 4
    assert summary["selected_on"] == "validation"  # the run's own split, not the old checkpoints' default
    assert (run_copy / "last.pt").read_bytes() == before


def test_resume_may_extend_the_schedule(run_copy):
    summary = TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(
        ["--resume", str(run_copy), "--quiet", "--no-explain", "--epochs", "3", "--max-steps", "1"]))
    assert summary["steps_done"] == 5 and summary["steps_total"] == 7 and not summary["complete"]


@pytest.mark.parametrize("flags", [["--seed", "7"], ["--image-size", "48"], ["--synthetic-train-per-class", "7"],
                                   ["--synthetic-seed", "5"], ["--crop", "none"]])
def test_resume_refuses_flags_that_change_the_data(run_copy, flags):
    with pytest.raises(ValueError, match=f"{flags[0]} cannot change on resume"):
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--quiet", *flags]))


@pytest.mark.parametrize("name", ["warm_add_on_lr", "warm_prototypes_lr", "joint_features_lr", "joint_add_on_lr",
                                  "joint_prototypes_lr", "weight_decay", "lr_step_size", "lr_gamma", "last_layer_lr"])
def test_resume_refuses_every_optimiser_setting_the_saved_states_hold(run_copy, name):
    """The saved optimisers and scheduler hold these: a new value would be silently replaced by the saved one."""
    saved = getattr(TRAIN_MAIN.TrainConfig.from_saved(load_checkpoint(str(run_copy))["config"]), name)
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} cannot change on resume"):
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--quiet", flag, str(saved * 2 + 1)]))


def test_resumed_flags_are_checked_against_the_run_not_the_preset(run_copy):
    """--warm-epochs 2 exceeds nothing in the run (2 epochs), though the demo preset has 20: not refused while
    parsing; the merged settings are what is checked."""
    cfg, explicit = TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--warm-epochs", "25"])
    assert cfg.warm_epochs == 25
    with pytest.raises(ValueError, match=r"warm_epochs \(25\) > epochs \(2\)"):
        TRAIN_MAIN.train(cfg, explicit)


def test_resume_goes_on_in_the_runs_own_directory(run_copy, tmp_path):
    with pytest.raises(ValueError, match="is not the resumed run's directory"):
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--out", str(tmp_path / "elsewhere")]))
    assert not (tmp_path / "elsewhere").exists()


def test_no_run_writes_through_a_symbolic_link_in_its_directory(run_copy, tmp_path, capsys):
    """A link left in a shared or handed-over run folder (metrics.csv -> a file of the user's, .lock -> another)
    made the run append to, truncate or overwrite files outside it: a fresh run and a resume are refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT USER DATA\n")
    fresh = tmp_path / "shared"
    fresh.mkdir()
    (fresh / "metrics.csv").symlink_to(victim)
    (run_copy / "push").rename(tmp_path / "push_elsewhere")
    (run_copy / "push").symlink_to(tmp_path / "push_elsewhere")
    for args, link, how in ((run_args(fresh), f"metrics.csv -> {victim}", "choose another --out"),
                            (["--resume", str(run_copy)], f"push -> {tmp_path / 'push_elsewhere'}",
                             "copy the run without links (cp -rL) and resume the copy")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        line = stderr_line(capsys)
        assert exit_info.value.code == 2
        assert line.endswith(f"holds a symbolic link ({link}): a run writes only its own files there; remove the "
                             f"link or {how} (--debug shows the traceback)")
    assert victim.read_text() == "IMPORTANT USER DATA\n" and sorted(os.listdir(fresh)) == ["metrics.csv"]
    lock = tmp_path / "lock_target"
    lock.write_text("keep\n")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").symlink_to(lock)
    with pytest.raises(OSError):  # the lock itself never follows a link (nor truncates its target)
        RunLock(str(tmp_path / "locked"))
    assert lock.read_text() == "keep\n"


def test_a_fresh_run_refuses_a_folder_holding_files_by_the_names_a_run_writes(tmp_path, capsys, monkeypatch):
    """A fresh run wrote into any folder without last.pt or summary.json: a project folder's config.yaml was
    replaced and its metrics.csv appended to. Refused unless the folder holds none of a run's names (a log the
    shell made first, a .gitkeep) or is a run stopped before its first step (it holds the run's lock file: the
    README's "run the same command again")."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: 1\n")
    (project / "metrics.csv").write_text("my,rows\n")
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(project))
    line = stderr_line(capsys)
    assert exit_info.value.code == 2
    assert line.endswith(f"--out {project} already holds files a run would write (config.yaml, metrics.csv) but "
                         f"no run: choose another --out (--debug shows the traceback)")
    assert (project / "config.yaml").read_text() == "mine: 1\n" and len(os.listdir(project)) == 2
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        main(run_args(tmp_path / "a_file"))
    assert stderr_line(capsys).endswith(f"--out {tmp_path / 'a_file'} is not a folder (--debug shows the traceback)")
    stopped = tmp_path / "stopped"  # what a run killed in its first step leaves
    stopped.mkdir()
    (stopped / ".lock").write_text("123\n")
    (stopped / "config.yaml").write_text("preset: demo\n")
    logged = tmp_path / "logged"  # mkdir runs/x && python -m protokern.train --out runs/x | tee runs/x/train.log
    logged.mkdir()
    (logged / "train.log").write_text("")
    (logged / ".gitkeep").write_text("")
    (logged / "lost+found").mkdir()  # a mount point's, which the user cannot read (root could: simulated)
    scandir = os.scandir

    def unreadable_lost_and_found(path="."):
        if os.path.basename(os.fspath(path)) == "lost+found":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable_lost_and_found)
    for folder in (stopped, logged):
        main(run_args(folder, "--max-steps", "1"))
        assert (folder / "last.pt").is_file()


def test_the_push_step_is_saved_only_with_its_pngs_written(tmp_path, monkeypatch):
    """The push PNGs were written in background threads and waited for only when the run ended: a SIGKILL after
    the push step's last.pt left them missing or truncated, and --resume (the push counted as done) never wrote
    them again. Slowed PNG writes: every one is on disk when a checkpoint after the push is written."""
    import time as time_module

    from protokern import push

    save_png = push.save_png

    def slow_save_png(*args, **kwargs):
        time_module.sleep(0.2)
        return save_png(*args, **kwargs)

    monkeypatch.setattr(push, "save_png", slow_save_png)
    seen = []
    write = TRAIN_MAIN.Trainer._write

    def checked_write(self, state, name):
        if state["push_records"] is not None:
            records = push.PushRecords.from_dict(state["push_records"])
            folder = os.path.dirname(self.records_path)
            expected = {push._png_name(j, kind) for j in records.pushed.nonzero().flatten().tolist()
                        for kind in ("source", "overlay")}
            seen.append((name, state["stage"], len(expected - set(os.listdir(folder)))))
        return write(self, state, name)

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "_write", checked_write)
    TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(run_args(tmp_path / "run")))
    assert ("last.pt", "push", 0) in seen and all(missing == 0 for _, _, missing in seen), seen


def test_failed_explanations_say_the_training_is_complete_and_how_to_write_them_again(run_copy, monkeypatch):
    """A disk filling up during the explanations gave 'explain_run failed: OSError: ...' and nothing on what was
    kept or how to redo them; --resume of the finished run writes them again."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run_copy / "gallery" / "gallery_000.png"))

    monkeypatch.setattr(TRAIN_MAIN, "explain_run", full)
    with pytest.warns(UserWarning, match=re.escape(
            f"the explanations failed (OSError: [Errno 28] No space left on device: '{run_copy}/gallery/gallery_000"
            f".png'); the training is complete: --resume {run_copy} writes them again")):
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--explain"]))
    monkeypatch.undo()
    TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy), "--explain"]))
    assert (run_copy / "gallery" / "index.html").is_file()


def test_a_resume_says_when_files_the_run_names_are_gone(run_copy):
    """best.pt and the push folder deleted by hand: the resumed run's summary named them as if present."""
    shutil.rmtree(run_copy / "push")
    (run_copy / "best.pt").unlink()
    with pytest.warns(UserWarning) as caught:
        TRAIN_MAIN.train(*TRAIN_MAIN.parse_config(["--resume", str(run_copy)]))
    said = [str(w.message) for w in caught if "resumed run's" in str(w.message)]
    assert len(said) == 2 and re.match(r"the resumed run's best\.pt \(step \d\) no longer exists: the summary "
                                       r"still reports", said[0]), said
    assert re.match(r"the resumed run's push records .*/push/epoch_\d+/push_records\.pt no longer exist", said[1])


def test_a_fresh_run_refuses_a_directory_holding_a_run(run_copy, capsys):
    rows = _rows(run_copy)
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(run_copy))
    line = stderr_line(capsys)
    assert exit_info.value.code == 2 and "already holds a run (last.pt)" in line and f"--resume {run_copy}" in line
    assert _rows(run_copy) == rows
    (run_copy / "last.pt").unlink()  # a finished run's last.pt removed to save space: --resume RUN cannot go on
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(run_copy))
    line = stderr_line(capsys)
    assert exit_info.value.code == 2 and "(summary.json) without its last.pt" in line
    assert f"--resume {run_copy / 'best.pt'})" in line and f"--resume {run_copy} " not in line
    (run_copy / "best.pt").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(run_copy))
    line = stderr_line(capsys)
    assert "(summary.json) without its last.pt: choose another --out" in line and "--resume" not in line
    assert _rows(run_copy) == rows


def test_default_run_directories_of_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TRAIN_MAIN.time, "strftime", lambda fmt: "20261201-000000")
    trainer = type("T", (), {"cfg": TRAIN_MAIN.TrainConfig(out=None), "is_main": True,
                             "info": type("I", (), {"enabled": False})()})()
    made = [TRAIN_MAIN.Trainer._run_dir(trainer) for _ in range(3)]
    assert made == [os.path.join("runs", "20261201-000000" + s) for s in ("", "-1", "-2")]
    assert all(os.path.isdir(d) for d in made)


BASE = {"a": 6, "b": 6, "c": 6}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A one-step run on a folder tree of 18 training images in classes a, b, c: (run, data root)."""
    root = folder_tree(tmp_path_factory.mktemp("data") / "base", BASE)
    run = root.parent / "run"
    main(folder_args(root, run, "--max-steps", "1"))
    return run, root


@pytest.mark.parametrize("counts, message", [
    ({"x": 6, "y": 6, "z": 6}, "--data-root {root} has classes [x, y, z] (3), the run was trained on [a, b, c] (3): "
                               "resume with the run's data"),
    ({**BASE, "d": 6}, "--data-root {root} has classes [a, b, c, d] (4), the run was trained on [a, b, c] (3)"),
    ({**BASE, "a": 12}, "the training set of --data-root {root} has 24 images, the run's had 18: the validation "
                        "split and push records hold only for the run's images"),
    ({**BASE, "a": 5}, "the training set of --data-root {root} has 17 images, the run's had 18"),
    ("renamed", "the 18 training images of --data-root {root} are not the run's (other files or labels, same count)"),
], ids=["renamed-classes", "one-more-class", "images-added", "image-removed", "image-renamed"])
def test_resume_refuses_other_data_naming_what_differs(folder_run, tmp_path, capsys, counts, message):
    """Other classes were accepted silently (or failed blaming a flag: "size mismatch for prototype_class_identity"),
    and another image list redrew the validation split and left the push records indexing other images."""
    run, base = folder_run
    root = tmp_path / "other"
    if counts == "renamed":  # the same count and classes, one file under another name
        shutil.copytree(base, root)
        (root / "train" / "b" / "0.png").rename(root / "train" / "b" / "9.png")
    else:
        folder_tree(root, counts)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", str(run), "--data-root", str(root), "--quiet"])
    line = stderr_line(capsys)
    assert exit_info.value.code == 2 and message.format(root=root) in line and "flag" not in line
    assert (run / "last.pt").read_bytes() == before


def test_resume_takes_the_same_data_moved_and_checkpoints_without_a_data_record(folder_run, tmp_path):
    """--data-root may move (the images' paths are kept relative to it); a checkpoint written before the data
    record was kept resumes without the check, and its next checkpoint has the record."""
    run, base = folder_run
    run = shutil.copytree(run, tmp_path / "run")
    moved = shutil.copytree(base, tmp_path / "moved")
    record = load_checkpoint(str(run))["data"]
    assert record["classes"] == ["a", "b", "c"] and record["train_images"] == 18
    summary = main(["--resume", str(run), "--data-root", str(moved), "--quiet", "--max-steps", "1"])
    assert summary["steps_done"] == 2 and load_checkpoint(str(run))["data"] == record
    state = load_checkpoint(str(run))
    del state["data"]
    save_checkpoint(state, str(run / "last.pt"))
    summary = main(["--resume", str(run), "--data-root", str(moved), "--quiet", "--max-steps", "1"])
    assert summary["steps_done"] == 3 and load_checkpoint(str(run))["data"] == record


def test_stanford_cars_data_record_is_the_same_flat_or_nested(tmp_path):
    """The record's image names are relative to the folder holding the images: Stanford Cars' nested
    cars_train/cars_train/ and a flat cars_train/ are the same data (a resume across them was refused), a
    renamed image is not."""
    from protokern.data import StanfordCars
    from tests.data.test_cars import make_cars

    flat, nested = make_cars(tmp_path / "flat"), make_cars(tmp_path / "nested", nested=True)
    record = TRAIN_MAIN._data_identity(StanfordCars(flat))
    assert record == TRAIN_MAIN._data_identity(StanfordCars(nested)) and record["train_images"] == 3
    moved = StanfordCars(nested)
    moved.paths = [p.replace("00003", "00009") for p in moved.paths]
    renamed = TRAIN_MAIN._data_identity(moved)
    assert renamed["images_hash"] != record["images_hash"]
    cfg = TRAIN_MAIN.TrainConfig(dataset="cars", data_root=str(nested))
    with pytest.raises(ValueError, match="are not the run's"):
        TRAIN_MAIN._check_same_data(record, renamed, cfg)
    older = {"classes": record["classes"], "train_images": 3, "train_hash": "0123456789abcdef"}  # before images_hash
    TRAIN_MAIN._check_same_data(older, renamed, cfg)
