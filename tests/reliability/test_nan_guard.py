"""Section 2 of issue 13: a non-finite loss or non-finite weights stop the run with an error naming the step
and stage, and never reach a checkpoint; --nan-policy skip skips such batches; the config refuses
non-finite numbers."""

import hashlib
import math

import pytest
import torch
from torch import nn

from protokern.checkpoint import load_checkpoint, nonfinite_tensors
from protokern.train import main
from protokern.train.config import parse_config
from protokern.train.loop import run_epoch

from .conftest import TRAIN_MAIN, no_temps, run_args, stderr_line

HUGE_LR = ["--joint-features-lr", "1e30", "--joint-add-on-lr", "1e30", "--joint-prototypes-lr", "1e30"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_huge_learning_rate_stops_the_run_and_keeps_the_checkpoints(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    before = {}
    real_step = TRAIN_MAIN.Trainer.run_step

    def run_step(self, step):
        if step.stage == "joint":  # the checkpoints as the warm-up step left them
            before.update({name: _digest(run / name) for name in ("last.pt", "best.pt")})
        return real_step(self, step)

    monkeypatch.setattr(TRAIN_MAIN.Trainer, "run_step", run_step)
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(run, *HUGE_LR))
    assert exit_info.value.code == 1
    line = stderr_line(capsys)
    assert "step 2/4 (joint, epoch 1)" in line and "non-finite" in line and "are as they were" in line
    assert before and {name: _digest(run / name) for name in before} == before
    for name in before:
        state = load_checkpoint(str(run / name))
        assert state["step"] == 0 and not nonfinite_tensors(state["model"])
    assert no_temps(run)


def test_nan_stop_keeps_its_traceback_with_debug(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 2/4 \(joint, epoch 1\)"):
        main(run_args(tmp_path / "run", *HUGE_LR, "--debug"))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x.flatten(1)[:, :2]), None


class _NanOnSecondBatch(nn.Module):
    """A loss that is NaN on the second training batch."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, logits, min_distances, labels, model):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, labels) * (math.nan if self.calls == 2 else 1.0)
        terms = dict.fromkeys(("ce", "cluster", "separation", "avg_separation", "l1"), 0.0)
        return loss, {**terms, "total": loss.item()}


def _epoch(policy):
    torch.manual_seed(0)
    model = _Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.rand(4, 3, 2, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    out = run_epoch(model, model, loader, _NanOnSecondBatch(), torch.device("cpu"), optimizer=optimizer,
                    nan_policy=policy)
    return out, len(steps), model


def test_nan_policy_skip_skips_the_batch():
    out, steps, model = _epoch("skip")
    assert out["skipped"] == 1 and steps == 2 and out["images"] == 8
    assert math.isfinite(out["total"]) and not nonfinite_tensors(model.state_dict())


def test_nan_policy_skip_stops_when_every_batch_is_skipped():
    class _AlwaysNan(_NanOnSecondBatch):
        def forward(self, logits, min_distances, labels, model):
            self.calls = 1  # the second call is NaN: always the second
            return super().forward(logits, min_distances, labels, model)

    model = _Model()
    loader = [(torch.rand(4, 3, 2, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    with pytest.raises(FloatingPointError, match="every one of the 3 batches had a non-finite loss"):
        run_epoch(model, model, loader, _AlwaysNan(), torch.device("cpu"),
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1), nan_policy="skip")


def test_nan_policy_stop_raises_before_the_step():
    with pytest.raises(FloatingPointError, match="non-finite loss .* at batch 1"):
        _epoch("stop")


def test_a_stop_for_another_process_does_not_name_this_ones_finite_loss(monkeypatch):
    """Under torchrun every process stops when one loss is not finite: the others say so, not '(1.17)'."""
    from protokern.train import loop

    monkeypatch.setattr(loop, "_on_any_rank", lambda flag, device: True)  # another process's loss was NaN
    model = _Model()
    loader = [(torch.rand(4, 3, 2, 2), torch.randint(0, 2, (4,)))]
    with pytest.raises(FloatingPointError, match=r"^non-finite loss on another process at batch 0$"):
        run_epoch(model, model, loader, _NanOnSecondBatch(), torch.device("cpu"),
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("flag", ["--joint-features-lr", "--last-layer-lr", "--cluster-coef", "--ce-coef",
                                  "--aug-rotate", "--aug-flip", "--weight-decay", "--lr-gamma"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_config_refuses_non_finite_numbers(flag, value):
    with pytest.raises(ValueError, match=f"{flag[2:].replace('-', '_')} must be finite"):
        parse_config(["--preset", "demo", f"{flag}={value}"])


def test_config_file_with_non_finite_value_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("joint_prototypes_lr: .inf\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2 and "joint_prototypes_lr must be finite" in stderr_line(capsys)


def test_nan_policy_flag_is_checked():
    assert parse_config(["--nan-policy", "skip"])[0].nan_policy == "skip"
    with pytest.raises(SystemExit):
        parse_config(["--nan-policy", "ignore"])


@pytest.mark.gpu
def test_gpu_fp16_run_with_skip_policy_resumes_from_safe_checkpoints(tmp_path):
    """On CUDA with fp16 autocast and --nan-policy skip: the checkpoints (CUDA RNG states included) load with
    plain weights_only, and a run resumed from them completes with finite weights."""
    run = tmp_path / "run"
    args = [a if a != "cpu" else "cuda" for a in run_args(run, "--amp", "fp16", "--nan-policy", "skip")]
    main(args + ["--max-steps", "2"])
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["rng"]["cuda"] and all(isinstance(s, torch.Tensor) for s in state["rng"]["cuda"])
    summary = main(["--resume", str(run), "--quiet", "--no-explain"])
    assert summary["complete"] and not nonfinite_tensors(load_checkpoint(str(run))["model"])


def _nan_loss(monkeypatch, every: bool):
    """The trainer's loss made NaN on the first training batch (``every``: on every training batch)."""
    real = TRAIN_MAIN.ProtoPNetLoss
    calls = []

    class Loss(real):
        def forward(self, *args, **kwargs):
            loss, terms = super().forward(*args, **kwargs)
            if torch.is_grad_enabled():  # a training batch
                calls.append(1)
                if every or len(calls) == 1:
                    loss = loss * math.nan
                    terms = {**terms, "total": loss.item()}
            return loss, terms

    monkeypatch.setattr(TRAIN_MAIN, "ProtoPNetLoss", Loss)


def test_the_trainer_warns_of_batches_skipped_under_nan_policy_skip(tmp_path, monkeypatch):
    _nan_loss(monkeypatch, every=False)
    with pytest.warns(UserWarning, match=r"^step 0 \(warm\): skipped 1 batch\(es\) with a non-finite loss "
                                         r"\(--nan-policy skip\)$"):
        summary = main(run_args(tmp_path / "run", "--nan-policy", "skip"))
    assert summary["complete"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_stop_suggests_the_skip_policy_only_to_a_run_without_it(tmp_path, capsys, monkeypatch, policy):
    _nan_loss(monkeypatch, every=True)
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tmp_path / "run", "--nan-policy", policy))
    line = stderr_line(capsys)
    assert exit_info.value.code == 1 and "step 1/4 (warm, epoch 0)" in line and "non-finite loss" in line
    assert ("(or --nan-policy skip to skip such batches)" in line) == (policy == "stop"), line


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_no_checkpoint_is_written_with_non_finite_weights_or_optimiser_state(tmp_path, where):
    """The trainer's one checkpoint writer (last.pt, best.pt, interrupted.pt, pruned.pt) refuses NaN anywhere in
    the weights or the optimisers' state (an Adam buffer too) and leaves the file on disk as it was."""
    from types import SimpleNamespace

    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous step's")
    state = {"model": {"w": torch.ones(3)}, "step": 0,
             "optimizers": {"joint": {"state": {0: {"exp_avg": torch.zeros(3)}}}}}
    bad = state["model"]["w"] if where == "model" else state["optimizers"]["joint"]["state"][0]["exp_avg"]
    bad[1] = math.nan
    trainer = SimpleNamespace(_path=lambda name: str(tmp_path / name))
    with pytest.raises(FloatingPointError, match=r"^not writing last.pt: non-finite values in "):
        TRAIN_MAIN.Trainer._write(trainer, state, "last.pt")
    assert path.read_bytes() == b"the previous step's" and no_temps(tmp_path)
    bad[1] = 0.0
    TRAIN_MAIN.Trainer._write(trainer, state, "last.pt")
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], state["model"]["w"])
