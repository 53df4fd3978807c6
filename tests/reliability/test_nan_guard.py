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
