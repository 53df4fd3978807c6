"""Two CPU processes on gloo through torchrun: the run completes, rank 0 writes, metrics cover all images."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from protokern.train.checkpoint import load_checkpoint
from protokern.train.config import TrainConfig
from protokern.train.data import build_datasets

from .conftest import TINY_ARGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "protokern.train", *TINY_ARGS, "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(run / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["stage"] for r in rows] == ["warm", "joint", "push", "last"]
    state = load_checkpoint(str(run))
    _, test_set, push_set, _ = build_datasets(TrainConfig(**state["config"]))
    for r in rows:  # accuracies are counts over the whole (unpadded) test set
        correct = r["test_accuracy"] * len(test_set)
        assert abs(correct - round(correct)) < 1e-6
    records = state["push_records"]
    labels = torch.tensor([push_set[i][1] for i in records["image_index"].tolist()])
    assert torch.equal(labels, records["prototype_class"])  # merged push picked own-class images
    assert (run / "summary.json").is_file() and (run / "push" / "epoch_001" / "push_records.pt").is_file()


def _worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from protokern.train.config import parse_config
    from protokern.train.distributed import DistInfo
    from protokern.train.main import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, _ = parse_config(TINY_ARGS + ["--out", os.path.join(out, "run"), "--no-push-images"])
        trainer = Trainer(cfg, DistInfo(rank, world, rank), torch.device("cpu"))
        summary = trainer.run()
        torch.save({"model": trainer.model.state_dict(), "summary": summary}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_end_identical(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same = lambda summary: {k: v for k, v in summary.items() if k != "timings"}  # noqa: E731 (timed per rank)
    assert same(a["summary"]) == same(b["summary"]) and a["summary"]["test_accuracy"] is not None  # rank 1's too


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but RANK is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
])
def test_a_bad_launch_environment_is_one_line(monkeypatch, env, message):
    from protokern.train.distributed import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")


def _worker_dies(rank: int, world: int, port: int, out: str):
    """Rank 1 disappears in its second step (a signal or an error that reached it alone); rank 0 records what the
    command line did."""
    import contextlib
    import importlib
    import io

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main_module = importlib.import_module("protokern.train.main")
    if rank == 1:
        run_step = main_module.Trainer.run_step

        def dying(self, step):
            if self.next_step == 1:
                os._exit(0)
            return run_step(self, step)

        main_module.Trainer.run_step = dying
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main_module.main(TINY_ARGS + ["--out", os.path.join(out, "run"), "--no-push-images", "--no-explain"])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as fh:
        fh.write(f"{code}\n{err.getvalue()}")


def test_a_process_that_stops_alone_stops_the_others_in_one_line(tmp_path):
    """A signal or error that reaches one process only: the others' collectives fail (gloo: connection closed by
    peer); each says so in one line with the command that resumes, exit 1, instead of the backend's traceback."""
    torch.multiprocessing.spawn(_worker_dies, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    code, *lines = (tmp_path / "rank0.txt").read_text().strip().splitlines()
    lines = [line for line in lines if "Warning" not in line and line.strip()]
    assert code == "1" and len(lines) == 1, lines
    assert lines[0].startswith("python -m protokern.train: error: another process of this torchrun job stopped")
    assert f"continue with --resume {tmp_path / 'run'} (after the last step last.pt holds)" in lines[0]


def test_a_lost_peer_is_a_closed_connection_not_a_timeout():
    from protokern.train.distributed import peer_lost

    assert peer_lost(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                                  "[127.0.0.1]:41623: Connection reset by peer"))
    assert peer_lost(RuntimeError("NCCL error: remote process exited or there was a network error"))
    assert not peer_lost(RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                                      "waiting 3000ms for recv operation to complete"))
    assert not peer_lost(ValueError("Connection closed by peer"))
