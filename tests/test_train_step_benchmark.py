"""benchmarks/train_step.py: its pieces, and a --quick run on the CPU (marked slow)."""
import json

import pytest
import torch

from benchmarks import train_step
from protokern import ProtoLayer
from protokern.data.transforms import uint8_to_float


def test_original_layer_computes_the_same_function():
    layer = ProtoLayer(6, 8)
    z = torch.rand(3, 8, 4, 4)
    ref, got = layer(z), train_step.OriginalLayer(layer)(z)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_input_batches_come_from_the_cache():
    data = train_step.MemoryImages(6, 8, 3)
    batches, mode = train_step.input_batches(data, 4, torch.device("cpu"), "memory")
    assert mode == "memory"
    seen = [next(batches) for _ in range(3)]  # drop_last: one batch of 4 per pass, passes reshuffled
    for images, labels in seen:
        assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
        matches = [(uint8_to_float(data.images) == img).all(dim=(1, 2, 3)).nonzero().flatten() for img in images]
        assert all(len(m) == 1 for m in matches)
        assert labels.tolist() == [data.targets[int(m[0])] for m in matches]


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    result = train_step.main(["--quick", "--backbones", "resnet34", "--out", str(tmp_path)])
    assert [r["setting"] for r in result["rows"]] == list(train_step.SETTINGS)
    for row in result["rows"]:
        assert row["step_images_per_s"] > 0 and row["input_images_per_s"] > 0 and row["cache"] == "memory"
    saved = json.loads((tmp_path / "train_step_quick.json").read_text())
    assert saved["rows"] == result["rows"] and saved["batch"] == 2
    table = (tmp_path / "train_step_quick.md").read_text()
    assert "| resnet34 | step |" in table and "| resnet34 | step + input |" in table
