"""CPU benchmark of push (prototype projection) over in-memory batches with the tiny trunk; marked ``bench``
(skipped by default; see tests/bench/test_bench_op.py for the commands)."""

import pytest
import torch

from benchmarks.push import DeviceBatches
from protokern.models import ProtoPNet
from protokern.push import push_prototypes

pytestmark = pytest.mark.bench

# (images, image size, batch size, classes, prototypes per class)
CASES = [(120, 64, 40, 10, 2), (64, 64, 32, 20, 10)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}img-{c[1]}px-{c[3] * c[4]}protos")
def test_push(benchmark, case):
    n, size, batch, classes, per_class = case
    torch.manual_seed(0)
    model = ProtoPNet(backbone="tiny", num_classes=classes, prototypes_per_class=per_class, prototype_dim=32).eval()
    data = DeviceBatches(n, batch, size, classes, torch.device("cpu"))
    before = model.prototype_layer.prototypes.detach().clone()

    def push():
        model.prototype_layer.prototypes.data.copy_(before)  # every round projects the same prototypes
        return push_prototypes(model, data, device="cpu", save_images=False, progress=False)

    benchmark.group = "push"
    benchmark.extra_info.update(images=n, image_size=size, prototypes=classes * per_class,
                                threads=torch.get_num_threads())
    records = benchmark.pedantic(push, rounds=3, iterations=1, warmup_rounds=1)
    assert records.pushed.all() and (records.image_index < n).all()
    assert not torch.equal(model.prototype_layer.prototypes.detach(), before)
