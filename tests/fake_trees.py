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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` 1-bit pixels and holding no pixel data (a decompression-bomb stand-in)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def write_bad_images(folder) -> dict[str, str]:
    """Write one file of each undecodable kind into ``folder``; returns ``{kind: file name}``.

    Kinds: a JPEG cut in half, garbage after a JPEG signature, a text file named .jpg, and PNG headers declaring
    20000x20000 (over twice PIL's limit: an error there) and 10000x10000 pixels (over it: a warning there).
    """
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    files = {"truncated": ("cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2]),
             "garbage": ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
             "text": ("text.jpg", b"not an image at all\n"),
             "bomb": ("bomb.png", png_header_only(20000, 20000)),
             "big": ("big.png", png_header_only(10000, 10000))}
    for name, data in files.values():
        (folder / name).write_bytes(data)
    return {kind: name for kind, (name, _) in files.items()}
