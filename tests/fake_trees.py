"""Writers shared by the tests that build fake dataset trees in the exact on-disk release formats."""

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
