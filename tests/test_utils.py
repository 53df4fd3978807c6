"""protokern.utils: the stop signal that long loops take between items."""
import io
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import protokern.utils as utils
from protokern.utils import (check_unit_range, class_name, image_order, positive_int, progress, stop, stop_deferred,
                             strict_json)


def _items(n, stop_at=None, fail_at=None, fetched=None):
    for i in range(n):
        if i == stop_at:  # a stop signal arrives while item i is being fetched
            signal.raise_signal(signal.SIGUSR1)
        if i == fail_at:
            raise RuntimeError("worker exited unexpectedly")
        fetched.append(i)
        yield i


@pytest.fixture
def stop_on_sigusr1():
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stop())
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_a_stop_waits_for_the_item_being_fetched(stop_on_sigusr1):
    fetched, seen = [], []
    with pytest.raises(KeyboardInterrupt):
        for item in progress(_items(6, stop_at=2, fetched=fetched), "test", enabled=False):
            seen.append(item)
    assert fetched == [0, 1, 2] and seen == [0, 1]
    assert [i for i in progress(_items(3, fetched=[]), "test", enabled=False)] == [0, 1, 2]  # nothing left over


def test_a_stop_wins_over_the_fetch_failing_after_it(stop_on_sigusr1):
    with pytest.raises(KeyboardInterrupt) as raised:
        with stop_deferred():
            signal.raise_signal(signal.SIGUSR1)
            raise RuntimeError("worker exited unexpectedly")
    assert isinstance(raised.value.__context__, RuntimeError)


def test_a_stop_outside_a_fetch_is_at_once(stop_on_sigusr1):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGUSR1)
        pytest.fail("the stop did not interrupt")
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with stop_deferred():  # nested blocks hold the stop until the outermost ends
            with stop_deferred():
                signal.raise_signal(signal.SIGUSR1)
            reached = True
    assert reached


def test_reports_are_strict_json():
    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": (2, "x"),
                        "f": (float("nan"), 1.0)})
    assert text == strict_json({"a": None, "b": [1.0, None], "c": {"d": None}, "e": [2, "x"], "f": [None, 1.0]})
    import json

    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))


def test_image_order_of_an_iterable_dataset_is_by_position():
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from protokern.utils import image_order

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(3, 4, 4), 0)] * 3)

    assert image_order(DataLoader(Stream(), batch_size=2)) == (None, None)  # (it looped forever)


def test_positive_int_is_the_one_check_of_a_count_argument():
    import numpy as np

    from protokern import ProtoLayer
    from protokern.data import ImageFolderDataset, load_image, make_loader
    from protokern.models import make_add_on
    from protokern.train.data import Repeated

    assert positive_int("k", np.int64(3)) == 3 and type(positive_int("k", np.int32(3))) is int
    for bad, error in ((0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError), ("3", TypeError),
                       (None, TypeError)):
        with pytest.raises(error, match=r"^k must be an integer >= 1, got "):
            positive_int("k", bad)
    # every public argument that counts something refuses a bool (True == 1 passed before) and takes NumPy ints
    for call, name in ((lambda v: ProtoLayer(v, 4), "num_prototypes"),
                       (lambda v: make_add_on("regular", v, 4), "in_channels"),
                       (lambda v: Repeated([0], v), "copies"),
                       (lambda v: ImageFolderDataset("/", image_size=v), "image_size"),
                       (lambda v: make_loader([0], v, False), "batch_size"),
                       (lambda v: load_image("unread.png", v), "image_size")):
        with pytest.raises(TypeError, match=f"^{name} must be an integer >= 1"):
            call(True)
    assert len(Repeated([0], np.int64(2))) == 2
    assert make_add_on("regular", np.int64(3), 4)[0].in_channels == 3
    assert make_loader([0, 1, 2], np.int64(2), False, num_workers=0).batch_size == 2


def test_image_batches_checks_images_and_labels():
    """Push, pruning and the metrics read batches through image_batches: uint8 or 0..255 images, one-hot or
    miscounted labels and labels outside the model's classes are one-line errors, not silently misread."""
    import torch

    from protokern.utils import image_batches

    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    images, labels = next(iter(image_batches([(x, y.int(), "extra")], num_classes=2)))
    assert images is x and labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    assert next(iter(image_batches([(x, [0.0, 1.0, 1.0, 0.0])])))[1].tolist() == y.tolist()
    assert next(iter(image_batches([(x, y.bool())], num_classes=2)))[1].tolist() == y.tolist()
    overshoot = x * 1.12 - 0.06  # a bicubic resize's [-0.06, 1.06]: taken
    assert next(iter(image_batches([(overshoot, y)])))[0] is overshoot
    bad = {
        "uint8_to_float": [((x * 255).to(torch.uint8), y)],
        r"in \[0, 1\].*\[0\.\d+, 2\d\d\.\d+\] \(0\.\.255 values\?\)": [(x * 255, y)],
        r"got values in \[-\d.*\(already normalised\?\)": [((x - 0.5) / 0.25, y)],
        r"\(B, 3, H, W\) tensor \(RGB\), or \(B, 1, H, W\) \(grayscale\), got shape \(4, 2, 8, 8\)": [(x[:, :2], y)],
        r"4 class indices.*shape \(4, 2\)": [(x, torch.nn.functional.one_hot(y))],
        r"4 class indices.*shape \(3,\)": [(x, y[:3])],
        "fractional": [(x, y + 0.5)],
        r"\[0, 2\) for a model of 2 classes, got labels in \[1, 2\]": [(x, y + 1)],
        r"\(images, labels, \.\.\.\) batches, got a Tensor$": [x],
        r"batches, got a dict with keys 'image', 'label'$": [{"image": x, "label": y}],
        r"batches, got a tuple of 1$": [(x,)],
        r"class indices \(integers\), got str values$": [(x, ["cat", "dog", "dog", "cat"])],
    }
    for message, loader in bad.items():
        with pytest.raises((ValueError, TypeError), match=message) as info:
            list(image_batches(loader, num_classes=2))
        assert "\n" not in str(info.value)
    assert len(image_batches([(x, y)] * 3)) == 3


def test_names_from_the_data_reach_a_terminal_without_control_characters():
    """A class folder named with escape sequences set the terminal's title, cleared it and printed fake lines."""
    from protokern.utils import listed, printable

    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE: all passed\x1b[0m\nnext line"
    assert printable(evil) == "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mFAKE: all passed\\x1b[0m\\nnext line"
    assert printable("001.Black_footed_Albatross été 鳥") == "001.Black_footed_Albatross été 鳥"
    assert printable("می\u200cخواهم \xa0soft\xadhyphen") == "می\u200cخواهم \xa0soft\xadhyphen"  # joiners kept
    assert printable("name\u202egnp.exe \u2028 \udcff") == "name\\u202egnp.exe \\u2028 \\udcff"  # bidi, lone
    assert listed([evil, "b"], 3) == printable(evil) + ", b"


def test_command_line_errors_and_bad_image_warnings_are_printable(tmp_path):
    """An undecodable image whose file name held escape codes sent them raw to stderr in the one-line error and
    in --skip-bad-images' warning."""
    import warnings

    from protokern.cli import one_line
    from protokern.data.cache import BadImageWarning, _bad
    from protokern.data.transforms import BadImageError

    error = BadImageError(str(tmp_path / "a\x1b]0;owned\x07.png"), "cannot identify image file")
    assert one_line(error) == f"{tmp_path}/a\\x1b]0;owned\\x07.png: cannot identify image file"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bad(error, True, [])
    assert [w.category for w in caught] == [BadImageWarning] and "\x1b" not in str(caught[0].message)


def test_listed_shortens_a_messages_list():
    from protokern.utils import listed

    assert listed(range(5), 3) == "0, 1, 2 and 2 more"
    assert listed(["a", "b"], 3) == "a, b" and listed([], 3) == ""


def test_parse_sides_is_the_size_grammar():
    """--prototype-size and explain's --image-size read "N" / "AxB" through one parser; a superscript digit (a
    str.isdigit character int() refuses) was int()'s 'invalid literal' through --prototype-size."""
    from protokern.train.config import parse_window
    from protokern.utils import parse_sides

    assert parse_sides("3") == (3, 3) and parse_sides(" 2 X 5 ") == (2, 5) and parse_sides(4) == (4, 4)
    for bad in ("²", "0", "2x", "x3", "-1", "+3", "1x2x3", "", "3.0"):
        assert parse_sides(bad) is None, bad
    with pytest.raises(ValueError, match="prototype_size must be K or KHxKW"):
        parse_window("²")


class _OnDevice:
    """A stand-in model whose parameters report ``device`` (model_device only reads ``p.device``)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def parameters(self):
        return iter([SimpleNamespace(device=self.device)])


def test_a_device_index_other_than_the_models_is_refused(monkeypatch):
    """'cuda' names the model's own cuda:i, but an explicit cuda:1 for a model on cuda:0 is a one-line ValueError
    (it was silently taken as cuda:0). The CUDA availability check is bypassed: no GPU is needed."""
    monkeypatch.setattr(utils, "checked_device", torch.device)
    model = _OnDevice("cuda:0")
    assert utils.model_device(model, "cuda") == torch.device("cuda:0")
    assert utils.model_device(model, "cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"^device='cuda:1' but the model is on cuda:0"):
        utils.model_device(model, "cuda:1")


def test_no_bar_is_written_to_a_stderr_that_is_not_a_terminal(monkeypatch):
    """progress(..., enabled=True) shows a bar only on a terminal: with stderr redirected to a file (a log, a batch
    job) it is disabled and writes nothing, while still yielding every item."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress(range(5), "decoding", enabled=True)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.disable is True and stream.getvalue() == ""


def test_order_through_nested_subsets_and_a_fixed_sampler():
    """The base-dataset index of each sample, in the loader's order: Subset(Subset(d, [3, 1, 2]), [2, 0]) yields
    d[2], d[3]; a fixed list sampler [1, 0] over Subset(d, [4, 0]) yields d[0], d[4]."""
    data = TensorDataset(torch.arange(5).float(), torch.arange(5))
    order, base = image_order(DataLoader(Subset(Subset(data, [3, 1, 2]), [2, 0]), batch_size=2))
    assert base is data and order.tolist() == [2, 3]
    order, base = image_order(DataLoader(Subset(data, [4, 0]), batch_size=1, sampler=[1, 0]))
    assert base is data and order.tolist() == [0, 4]


def test_a_class_without_a_name_is_shown_by_its_index():
    """Names cover classes 0..len-1: class len(names) (one past the end) and beyond, negatives and no names at
    all give the index as a string instead of an IndexError."""
    names = ["red", "green"]
    assert [class_name(names, c) for c in (0, 1, 2, 5, -1)] == ["red", "green", "2", "5", "-1"]
    assert class_name(None, 3) == "3"


def test_normalised_images_are_refused_and_overshoot_passes():
    """Values below -0.5 are a one-line error saying they look already normalised, also when none is above 1.5
    (a dark ImageNet-normalised image spans about [-2.1, 1.2]); resampling overshoot (-0.06 .. 1.06) passes."""
    dark = torch.linspace(-2.1, 1.2, 3 * 8 * 8).view(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"already normalised"):
        check_unit_range(dark)
    check_unit_range(torch.tensor([-0.06, 0.5, 1.06]).view(1, 3, 1, 1))


def test_default_workers_are_the_cpus_but_one_at_most_8(monkeypatch):
    """One usable CPU: no worker processes (the main process loads); 2 CPUs: 1; 16: capped at 8."""
    for cpus, want in ((1, 0), (2, 1), (16, 8)):
        monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert utils.default_num_workers() == want


def test_listed_counts_only_the_items_left_out():
    """Exactly ``limit`` items are all shown, with no "and 0 more"; one more is counted."""
    assert utils.listed(["a", "b"], 2) == "a, b"
    assert utils.listed(["a", "b", "c"], 2) == "a, b and 1 more"


def test_printable_escapes_lone_surrogates_and_controls():
    """A lone surrogate (a file name decoded with surrogateescape) and a newline are shown as escapes; a joiner
    that scripts need stays as it is."""
    assert utils.printable("a\ud800b\nc") == "a\\ud800b\\nc"
    assert utils.printable("\u0915\u094d\u200d") == "\u0915\u094d\u200d"


def test_first_line_is_the_message_s_first_line_or_the_type():
    """A multi-line message gives its first line; an empty one the exception type's name."""
    assert utils.first_line(ValueError("one\ntwo")) == "one"
    assert utils.first_line(KeyError()) == "KeyError"


def test_unwrap_takes_off_nested_data_parallel_wrappers():
    """DataParallel(DataParallel(model)): the model inside both (push and explanations read its attributes)."""
    model = torch.nn.Linear(2, 2)
    assert utils.unwrap(torch.nn.DataParallel(torch.nn.DataParallel(model))) is model
