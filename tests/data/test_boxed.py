"""The annotation-table helpers of the boxed datasets (CUB, Stanford Cars): fields, paths and numbers."""

import os

import pytest

from protokern.data._boxed import inside_folder, parse_number, read_table


def test_the_last_field_takes_the_rest_of_the_line(tmp_path):
    path = tmp_path / "images.txt"
    path.write_text("1 001.Bird/a b c.jpg\n\n2  002.Bird/d.jpg \n3\n")
    with pytest.raises(ValueError, match=r"images.txt:4: expected 2 fields, got '3'"):
        read_table(str(path), 2)
    path.write_text("1 001.Bird/a b c.jpg\n\n2  002.Bird/d.jpg \n")
    assert read_table(str(path), 2) == [(1, ["1", "001.Bird/a b c.jpg"]), (3, ["2", "002.Bird/d.jpg"])]


def test_image_paths_stay_inside_their_folder(tmp_path):
    folder = str(tmp_path / "images")
    assert inside_folder(folder, "a/b.jpg", "t") == os.path.join(folder, "a", "b.jpg")
    for rel in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", os.path.join(folder, "a.jpg")):  # absolute: refused
        with pytest.raises(ValueError, match="leads outside"):
            inside_folder(folder, rel, "t")


def test_numbers_are_finite_and_integers_whole():
    assert parse_number("f", 1, "2.5") == 2.5 and parse_number("f", 1, "3", int) == 3
    assert parse_number("f", 1, "3.0", int) == 3 and type(parse_number("f", 1, "3.0", int)) is int
    for text, kind, what in (("1.5", int, "an integer"), ("nan", float, "a finite number"),
                             ("inf", float, "a finite number"), ("x", int, "an integer")):
        with pytest.raises(ValueError, match=f"f:7: expected {what}, got '{text}'"):
            parse_number("f", 7, text, kind)


def test_a_sibling_folder_with_the_same_prefix_is_outside(tmp_path):
    """``../images2/x.jpg`` from ``images`` leads to ``images2``, outside ``images`` although its path starts with
    the folder's path as a string: refused (judged by path components, not by string prefix)."""
    folder = str(tmp_path / "images")
    for rel in ("../images2/x.jpg", "../images_extra/a/b.jpg"):
        with pytest.raises(ValueError, match="leads outside"):
            inside_folder(folder, rel, "t")
    assert inside_folder(folder, "images2/x.jpg", "t") == os.path.join(folder, "images2", "x.jpg")
