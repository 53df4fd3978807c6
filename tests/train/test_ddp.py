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
