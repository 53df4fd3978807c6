"""Writers and checks shared by the tests that build fake dataset trees in the exact on-disk release formats."""

import torch

# CUB_200_2011 annotation files and the key of their lines in the dict the tests fill
CUB_FILES = {"images.txt": "images", "image_class_labels.txt": "labels", "train_test_split.txt": "split",
             "bounding_boxes.txt": "boxes", "parts/part_locs.txt": "parts"}


def new_cub_lines() -> dict[str, list[str]]:
    """Empty line lists, one per CUB annotation file (see ``CUB_FILES``)."""
    return {key: [] for key in CUB_FILES.values()}


def write_cub_annotations(base, lines: dict[str, list[str]], classes: list[str]) -> None:
    """Write the annotation files, classes.txt and parts/parts.txt (15 parts) of a CUB_200_2011 folder."""
    for name, key in CUB_FILES.items():
        (base / name).write_text("\n".join(lines[key]) + "\n")
    (base / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (base / "parts" / "parts.txt").write_text("".join(f"{p} part_{p}\n" for p in range(1, 16)))


def check_items(ds, size: int) -> None:
    """Every item of ``ds`` is a float32 (3, size, size) image in [0, 1] with the label of ``ds.targets``."""
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32 and y == ds.targets[i]
        assert 0 <= x.min() and x.max() <= 1
