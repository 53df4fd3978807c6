"""CUB200 on a tiny fake tree in the official CUB_200_2011 on-disk format."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.data import CUB200
from tests.fake_trees import check_items, new_cub_lines, write_cub_annotations

GREY, RED = (90, 90, 90), (230, 20, 20)
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (class_id, is_train, (w, h), bird box x y w h, image mode)
IMAGES = [
    (1, 1, (80, 60), (10.0, 5.0, 40.0, 30.0), "RGB"),
    (2, 0, (64, 64), (0.0, 0.0, 64.0, 64.0), "RGB"),
    (2, 1, (50, 70), (20.0, 30.0, 25.0, 35.0), "L"),
    (3, 1, (90, 40), (30.0, 10.0, 30.0, 20.0), "CMYK"),
    (3, 0, (70, 70), (5.0, 5.0, 60.0, 60.0), "RGBA"),
]


def make_cub(root, images=IMAGES):
    """Write the release layout: text files, parts/ and images/<class dir>/<name>.jpg."""
    base = root / "CUB_200_2011"
    (base / "parts").mkdir(parents=True)
    lines = new_cub_lines()
    for i, (cid, train, (w, h), (bx, by, bw, bh), mode) in enumerate(images, 1):
        rel = f"{CLASSES[cid - 1]}/{CLASSES[cid - 1][4:]}_{i:04d}_{i}.jpg"
        arr = np.zeros((h, w, 3), np.uint8) + np.array(GREY, np.uint8)
        arr[int(by):int(by + bh), int(bx):int(bx + bw)] = RED
        img = Image.fromarray(arr)
        img = img.convert("L") if mode == "L" else img.convert(mode) if mode != "RGB" else img
        (base / "images" / CLASSES[cid - 1]).mkdir(parents=True, exist_ok=True)
        img.save(base / "images" / rel, "PNG" if mode == "RGBA" else "JPEG", quality=100)
        lines["images"].append(f"{i} {rel}")
        lines["labels"].append(f"{i} {cid}")
        lines["split"].append(f"{i} {train}")
        lines["boxes"].append(f"{i} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
        for part in range(1, 16):  # part 1 at the box centre, part 2 invisible, part 3 outside the box
            x, y, vis = {1: (bx + bw / 2, by + bh / 2, 1), 3: (bx + bw + 2, by, 1)}.get(part, (0.0, 0.0, 0))
            lines["parts"].append(f"{i} {part} {x:.1f} {y:.1f} {vis}")
    write_cub_annotations(base, lines, CLASSES)
    return base


@pytest.fixture()
def cub_root(tmp_path):
    make_cub(tmp_path)
    return tmp_path


def test_splits_labels_classes(cub_root):
    train = CUB200(cub_root, "train", image_size=32)
    test = CUB200(cub_root / "CUB_200_2011", "test", image_size=32)  # the release folder itself works
    assert train.image_ids == [1, 3, 4] and test.image_ids == [2, 5]
    assert train.targets == [0, 1, 2] and test.targets == [1, 2]
    assert train.classes == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert len(train) == 3 and len(test) == 2
    for ds in (train, test):
        check_items(ds, 32)


def test_bbox_crop_is_the_bird(cub_root):
    ds = CUB200(cub_root, "train", crop="bbox", image_size=24)
    red = torch.tensor(RED).view(3, 1, 1) / 255.0
    for i in range(len(ds)):
        x, _ = ds[i]
        if i == 1:  # grayscale source: the box is uniformly the grey level of red
            assert x.std(dim=(1, 2)).max() < 0.03 and (x[0] - x[1]).abs().max() < 1e-6
            continue
        assert (x - red).abs().mean() < 0.04, i
    assert torch.allclose(ds.boxes, torch.tensor([0.0, 0.0, 24.0, 24.0]).expand(3, 4))


def test_no_crop_boxes_in_output_pixels(cub_root):
    ds = CUB200(cub_root, "train", crop="none", image_size=40)
    # image 1: 80x60, box (10, 5) + (40, 30) -> scale (0.5, 2/3)
    assert torch.allclose(ds.boxes[0], torch.tensor([5.0, 5.0 * 40 / 60, 25.0, 35.0 * 40 / 60]))
    x, _ = ds[0]
    x0, y0, x1, y1 = ds.boxes[0].tolist()
    inside = x[:, int(y0) + 2:int(y1) - 2, int(x0) + 2:int(x1) - 2]
    assert (inside[0] > 0.8).all() and (inside[1] < 0.2).all()
    assert (x[:, :, 30:] - 90 / 255).abs().max() < 0.05  # right of the box: background


def test_part_locations(cub_root):
    ds = CUB200(cub_root, "train", crop="bbox", image_size=40)
    loc = ds.part_locations(0)
    assert loc.shape == (15, 3) and ds.part_names[0] == "part_1"
    assert torch.allclose(loc[0], torch.tensor([20.0, 20.0, 1.0]))  # box centre -> image centre
    assert loc[1, 2] == 0  # marked invisible
    assert loc[2, 2] == 0  # visible in the source but outside the crop
    full = CUB200(cub_root, "train", crop="none", image_size=40)
    loc = full.part_locations(0)
    assert torch.allclose(loc[0], torch.tensor([15.0, 20.0 * 40 / 60, 1.0]))
    assert torch.allclose(loc[2], torch.tensor([26.0, 5.0 * 40 / 60, 1.0]))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.txt"):
        CUB200(tmp_path)
    base = make_cub(tmp_path)
    os.remove(base / "bounding_boxes.txt")
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        CUB200(tmp_path)


def test_missing_parts_and_images(cub_root):
    base = cub_root / "CUB_200_2011"
    os.remove(base / "parts" / "part_locs.txt")
    ds = CUB200(cub_root)  # parts are optional until asked for
    with pytest.raises(FileNotFoundError, match="part_locs.txt"):
        ds.part_locations(0)
    os.remove(ds.paths[0])
    with pytest.raises(FileNotFoundError, match=os.path.basename(ds.paths[0])):
        ds[0]


def test_malformed_and_inconsistent_files(cub_root):
    base = cub_root / "CUB_200_2011"
    boxes = (base / "bounding_boxes.txt").read_text()
    (base / "bounding_boxes.txt").write_text(boxes.replace("10.0 5.0", "ten 5.0"))
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1"):
        CUB200(cub_root)
    (base / "bounding_boxes.txt").write_text("\n".join(boxes.splitlines()[1:]) + "\n\n")
    with pytest.raises(ValueError, match="no entry for image id 1"):
        CUB200(cub_root)
    (base / "bounding_boxes.txt").write_text(boxes)
    (base / "image_class_labels.txt").write_text("1 1\n2 2\n3 9\n4 3\n5 3\n")
    with pytest.raises(ValueError, match="class id 9"):
        CUB200(cub_root)
    (base / "image_class_labels.txt").write_text("1 1\n2 2\n3 2\n4 3\n5 3\n")
    (base / "bounding_boxes.txt").write_text(boxes.replace("10.0 5.0", "nan 5.0"))
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1: expected a finite number, got 'nan'"):
        CUB200(cub_root)
    (base / "bounding_boxes.txt").write_text(boxes)
    split = (base / "train_test_split.txt").read_text()
    (base / "train_test_split.txt").write_text("1 2\n" + "\n".join(split.splitlines()[1:]) + "\n")
    with pytest.raises(ValueError, match=r"train_test_split.txt:1: expected 1 \(train\) or 0 \(test\), got 2"):
        CUB200(cub_root)


def test_files_with_a_byte_order_mark_read(cub_root):
    before = CUB200(cub_root)
    for name in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
                 "bounding_boxes.txt"):
        path = cub_root / "CUB_200_2011" / name
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    after = CUB200(cub_root)
    assert after.paths == before.paths and after.targets == before.targets and after.classes == before.classes


def test_non_utf8_annotation_file_named(cub_root):
    path = cub_root / "CUB_200_2011" / "classes.txt"
    path.write_bytes(path.read_bytes().replace(b"Laysan", b"L\xe9ysan"))  # Latin-1, line 2
    with pytest.raises(ValueError, match=r"classes.txt:2: not UTF-8 text \(byte 0xe9"):
        CUB200(cub_root)


def test_box_outside_its_image_names_the_file(cub_root):
    path = cub_root / "CUB_200_2011" / "bounding_boxes.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["1 500.0 500.0 10.0 10.0"] + lines[1:]) + "\n")  # image 1 is 80x60
    ds = CUB200(cub_root, "train", image_size=16)
    name = os.path.basename(ds.paths[0])
    for what in (lambda: ds[0], lambda: ds.mapping(0), lambda: ds.boxes, lambda: ds.part_locations(0)):
        with pytest.raises(ValueError, match=f"{name}: crop box .* outside the 80x60 image"):
            what()


def test_bad_arguments(cub_root):
    with pytest.raises(ValueError, match="split"):
        CUB200(cub_root, split="val")
    with pytest.raises(ValueError, match="crop"):
        CUB200(cub_root, crop="center")


def test_class_ids_duplicates_and_parts_below_the_crop(cub_root):
    """classes.txt in any line order maps by id; a duplicated id is one line naming it; a part visible in the
    source but below the crop (x inside) is invisible."""
    base = cub_root / "CUB_200_2011"
    classes = (base / "classes.txt").read_text().splitlines()
    (base / "classes.txt").write_text("\n".join(classes[::-1]) + "\n")
    ds = CUB200(cub_root, "train", image_size=32)
    assert ds.classes == [name[4:] for name in CLASSES] and ds.targets == [0, 1, 2]
    parts = (base / "parts" / "part_locs.txt").read_text()
    below = parts.replace("1 4 0.0 0.0 0\n", "1 4 30.0 37.0 1\n")  # image 1's box: x 10..50, y 5..35
    assert below != parts
    (base / "parts" / "part_locs.txt").write_text(below)
    loc = CUB200(cub_root, "train", crop="bbox", image_size=40).part_locations(0)
    assert loc[3, 0] == 20.0 and loc[3, 1] > 40 and loc[3, 2] == 0
    (base / "classes.txt").write_text("\n".join(classes + [classes[0]]) + "\n")
    with pytest.raises(ValueError, match=r"classes.txt:4: duplicate id 1"):
        CUB200(cub_root)


def test_a_zero_part_id_is_an_error_naming_the_line(tmp_path):
    """A part_locs.txt written with 0-based part ids would silently lose part 0 (and shift every other part by
    one): the first 0 is a ValueError naming the file and line."""
    base = make_cub(tmp_path)
    path = base / "parts" / "part_locs.txt"
    lines = path.read_text().splitlines()
    lines[0] = "1 0 5.0 5.0 1"
    path.write_text("\n".join(lines) + "\n")
    ds = CUB200(tmp_path, "train", image_size=40)
    with pytest.raises(ValueError, match=r"part_locs.txt:1: part ids are 1-based, got 0"):
        ds.part_locations(0)


def test_part_locations_are_the_same_on_every_call(cub_root):
    """Asking twice for an image's parts gives the same answer: the mapping to output pixels is applied to a copy,
    not written into the cached source-pixel table (which mapped the points again on every call)."""
    ds = CUB200(cub_root, "train", crop="bbox", image_size=40)
    first = [ds.part_locations(i) for i in range(len(ds))]
    again = [ds.part_locations(i) for i in range(len(ds))]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    assert torch.allclose(first[0][0], torch.tensor([20.0, 20.0, 1.0]))  # box centre -> image centre
