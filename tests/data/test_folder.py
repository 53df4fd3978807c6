"""ImageFolderDataset on a small class-per-folder tree with mixed image modes."""
import os
import warnings

import pytest
import torch
from PIL import Image

from protokern.data import ImageFolderDataset


def make_tree(root):
    (root / "cat").mkdir(parents=True)
    (root / "ant").mkdir()
    Image.new("RGBA", (30, 20), (255, 0, 0, 255)).save(root / "cat" / "a.png")
    Image.new("L", (10, 10), 128).save(root / "cat" / "b.jpg")
    Image.new("CMYK", (12, 8), (0, 0, 0, 0)).save(root / "ant" / "c.jpg")
    pal = Image.new("P", (9, 9), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.save(root / "ant" / "d.png")
    (root / "ant" / "notes.txt").write_text("not an image")


def test_classes_targets_and_items(tmp_path):
    make_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert ds.classes == ["ant", "cat"] and ds.class_to_idx == {"ant": 0, "cat": 1}
    assert len(ds) == 4 and sorted(ds.targets) == [0, 0, 1, 1]
    expected = {"a.png": (1, 0, 0), "b.jpg": (128 / 255,) * 3, "c.jpg": (1, 1, 1), "d.png": (0, 1, 0)}
    for i, path in enumerate(ds.paths):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == ds.targets[i]
        colour = torch.tensor(expected[path.rsplit("/", 1)[-1]], dtype=torch.float32)
        assert torch.allclose(x.mean(dim=(1, 2)), colour, atol=0.02), path


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path)  # no class folders
    make_tree(tmp_path / "t")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(tmp_path / "t", image_size=0)


def test_hidden_entries_are_left_out(tmp_path):
    """Jupyter's .ipynb_checkpoints, macOS ._ files, .DS_Store: no classes, no images, not in the warning."""
    make_tree(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "cat" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with pytest.warns(UserWarning, match="1 file") as caught:  # ant/notes.txt only
        hidden = ImageFolderDataset(tmp_path, image_size=8)
    assert len(caught) == 1 and "notes.txt" in str(caught[0].message)
    assert hidden.classes == ["ant", "cat"] and len(hidden) == 4
    assert not any("/." in path for path in hidden.paths)


def test_a_broken_link_is_a_bad_image(tmp_path):
    from protokern.data import BadImageError, prepare_images

    make_tree(tmp_path)
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    broken = ds.paths.index(str(tmp_path / "cat" / "gone.png"))
    with pytest.raises(BadImageError, match="gone.png: a broken symbolic link"):
        ds[broken]
    with pytest.warns(UserWarning, match="gone.png"):
        view = prepare_images(ds, "memory", skip_bad_images=True)
    assert len(view) == 4


def test_folder_links_that_loop_are_listed_once_and_named(tmp_path):
    """torchvision's walk follows folder links without remembering them: a link to '.' listed each image of the
    class ~40 times (down to the kernel's link limit), two such links walked 2^40 folders and never ended.
    Each real folder is now walked once per class; the links left out are named in one warning. A class folder
    that is itself a link, or links to another class's folder, are unchanged (each class lists its images)."""
    make_tree(tmp_path)
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")
    (tmp_path / "cat" / "sub").mkdir()
    (tmp_path / "cat" / "sub" / "up").symlink_to(tmp_path / "cat")
    (tmp_path / "cat" / "sub" / "e.png").write_bytes((tmp_path / "cat" / "a.png").read_bytes())
    (tmp_path / "cat" / "ants").symlink_to(tmp_path / "ant")
    (tmp_path / "dog").symlink_to(tmp_path / "ant", target_is_directory=True)
    (tmp_path / "cat" / "a_short").symlink_to(tmp_path / "cat" / "sub")  # sorts first: the real sub is kept
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "f.png").write_bytes((tmp_path / "cat" / "a.png").read_bytes())
    (outside / "x" / "back").symlink_to(outside)  # a loop outside the tree, reached through a link
    (tmp_path / "cat" / "out").symlink_to(outside)
    with pytest.warns(UserWarning, match=r"4 folder link\(s\) to a folder already listed \(a loop or a second way "
                                         r"in\) not followed: .*/cat/a_short, .*/cat/loop, .*/cat/out/x/back, "
                                         r".*/cat/sub/up"):
        ds = ImageFolderDataset(tmp_path, image_size=16)
    names = {c: sorted(p[len(str(tmp_path)) + 1:] for p, t in ds.samples if ds.classes[t] == c) for c in ds.classes}
    assert names == {"ant": ["ant/c.jpg", "ant/d.png"], "cat": ["cat/a.png", "cat/ants/c.jpg", "cat/ants/d.png",
                                                                "cat/b.jpg", "cat/out/x/f.png", "cat/sub/e.png"],
                     "dog": ["dog/c.jpg", "dog/d.png"]}


def test_the_order_is_torchvision_imagefolders(tmp_path):
    """Classes, then folder path, then file name, whatever order the file system lists them in (created here in
    a shuffled order): the labels and the push records' image indices depend on it."""
    import random

    from torchvision.datasets import ImageFolder

    names = [f"class_{c}" for c in "qzbma"]
    files = [(name, sub, f"{stem}.png") for name in names for sub in ("", "inner", "a", "a/x", "a-b")
             for stem in ("z", "b", "m", "a10", "a2")]  # (a walk gives a, a/x, a-b; sorted paths a, a-b, a/x)
    random.Random(0).shuffle(files)
    for name, sub, file in files:
        folder = tmp_path / name / sub
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(folder / file)
    ds = ImageFolderDataset(tmp_path, image_size=4)
    reference = ImageFolder(str(tmp_path))
    assert ds.classes == reference.classes == sorted(names)
    assert [(str(p), y) for p, y in zip(ds.paths, ds.targets)] == reference.samples


def test_a_class_folder_without_images_is_refused(tmp_path):
    """root/ant holds an image, root/bee only a text file and root/cat nothing: ImageFolderDataset raises a
    FileNotFoundError naming bee and cat (a class the model could never learn, whose labels would shift nothing
    but leave a dead output), as torchvision's ImageFolder does."""
    for name in ("ant", "bee", "cat"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ant" / "a.png")
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"no images in the class folders bee, cat"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_a_visible_link_to_a_hidden_folder_is_followed(tmp_path):
    """cat/shown is a folder link to cat/.stash (hidden, never listed itself): its image is listed once, through
    the link, with no 'folder link already listed' warning (the hidden folder must not count as listed)."""
    cat = tmp_path / "cat"
    (cat / ".stash").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(cat / "a.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(cat / ".stash" / "b.png")
    os.symlink(cat / ".stash", cat / "shown", target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert [os.path.relpath(p, tmp_path) for p in ds.paths] == ["cat/a.png", "cat/shown/b.png"]
