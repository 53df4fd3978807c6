"""Shared tiny training configuration (CPU, seconds)."""

import pytest

TINY_ARGS = [
    "--preset", "demo", "--synthetic-classes", "3", "--synthetic-train-per-class", "6",
    "--synthetic-test-per-class", "4", "--image-size", "32", "--prototypes-per-class", "2",
    "--prototype-dim", "8", "--epochs", "2", "--warm-epochs", "1", "--push-start", "1", "--push-every", "1",
    "--last-layer-epochs", "1", "--train-batch-size", "8", "--test-batch-size", "8", "--push-batch-size", "8",
    "--num-workers", "0", "--quiet", "--device", "cpu", "--seed", "3", "--augment",
]


@pytest.fixture
def tiny_args(tmp_path):
    """Flags of a 4-step run (warm, joint, push, last) on 18 synthetic 32x32 images, in a fresh run dir."""
    return TINY_ARGS + ["--out", str(tmp_path / "run")]
