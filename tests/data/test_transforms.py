"""Image loading (any PIL mode -> RGB), crop/resize mapping and ImageNet normalisation."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.data import imagenet_denormalize, imagenet_normalize, load_image, open_rgb, to_rgb
from protokern.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, crop_box_pixels, map_boxes, output_mapping,
                                       uint8_to_float)


def _rgb(img):
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_rgba_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = _rgb(Image.fromarray(arr, "RGBA"))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == 255).all()


def test_grayscale_modes():
    gray = Image.fromarray(np.full((3, 5), 77, np.uint8), "L")
    assert (_rgb(gray) == 77).all()
    bw = Image.new("1", (4, 4), 1)
    assert (_rgb(bw) == 255).all()
    la = Image.fromarray(np.stack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 255, np.uint8)], -1), "LA")
    assert (_rgb(la) == 10).all()
    deep = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert deep.mode.startswith("I")
    assert (_rgb(deep) == 255).all()


def test_palette_and_cmyk():
    pal = Image.new("P", (3, 3))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = _rgb(pal)
    assert tuple(out[1, 1]) == (10, 20, 30) and tuple(out[0, 0]) == (0, 0, 0)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert (_rgb(cmyk) == [255, 0, 0]).all()


def _first_pixel(path):
    return int(np.asarray(open_rgb(path))[0, 0, 0])


def test_deep_grayscale_scale_comes_from_the_format_not_the_pixels(tmp_path):
    for value, expected in ((200, 1), (30000, 117)):  # round(value / 65535 * 255)
        arr = np.full((2, 2), value, np.uint16)
        (tmp_path / "a.pgm").write_bytes(b"P5 2 2 65535\n" + arr.astype(">u2").tobytes())  # mode "I"
        Image.fromarray(arr).save(tmp_path / "a.png")  # mode "I;16"
        assert _first_pixel(tmp_path / "a.pgm") == _first_pixel(tmp_path / "a.png") == expected
        assert (_rgb(Image.fromarray(arr.astype(np.int32))) == expected).all()  # "I" without a tag: 16-bit
    for value, expected in ((200, 0), (2 ** 31 - 1, 255)):  # signed 32-bit TIFF: 0..2**31 - 1
        Image.fromarray(np.full((2, 2), value, np.int32)).save(tmp_path / "a.tif")
        assert Image.open(tmp_path / "a.tif").mode == "I" and _first_pixel(tmp_path / "a.tif") == expected


def test_float_grayscale_is_taken_as_0_to_1():
    arr = np.full((2, 3), 0.5, np.float32)
    arr[0, :] = (1.01, np.nan, -2.0)  # clipped, NaN -> 0, clipped
    image = Image.fromarray(arr, "F")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN is replaced, not cast (an invalid-value cast warns and is undefined)
        out = _rgb(image)[..., 0]
    assert out.tolist() == [[255, 0, 0], [128, 128, 128]]


def test_resizing_is_pils_bilinear(tmp_path):
    arr = (np.random.default_rng(0).random((6, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, _ = load_image(tmp_path / "a.png", image_size=8)
    expected = np.asarray(Image.fromarray(arr).resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_rgb_transparency_key_composited_on_white(tmp_path):
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[0, 0] = (10, 20, 30)
    Image.fromarray(arr).save(tmp_path / "key.png", transparency=(10, 20, 30))
    assert Image.open(tmp_path / "key.png").mode == "RGB"
    out = np.asarray(open_rgb(tmp_path / "key.png"))
    assert (out[0, 0] == 255).all() and (out[1] == 0).all()
    plain = Image.fromarray(arr)
    assert to_rgb(plain) is plain  # no key: returned as is


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                       ("L", "JPEG"), ("RGB", "JPEG")])
def test_load_image_any_mode(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new(mode, (20, 10)).save(path, fmt)
    x, mapping = load_image(path, image_size=16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert mapping == (0.0, 0.0, 16 / 20, 16 / 10)


def test_open_rgb_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        open_rgb(tmp_path / "nope.jpg")


def test_crop_box_pixels():
    assert crop_box_pixels((2.0, 3.0, 10.0, 12.0), 20, 20) == (2, 3, 10, 12)
    assert crop_box_pixels((2.4, 3.6, 9.5, 11.2), 20, 20) == (2, 3, 10, 12)  # widened to whole pixels
    assert crop_box_pixels((-5, -1, 30, 25), 20, 20) == (0, 0, 20, 20)  # clipped
    # float noise at a whole-pixel edge (a CUB box's x + width) adds no pixel, at an end or at a start
    assert crop_box_pixels((0.0, 0.0, 10.0 + 1e-9, 12.0 + 1e-9), 20, 20) == (0, 0, 10, 12)
    assert crop_box_pixels((2.0 - 1e-9, 3.0 - 1e-9, 10.0, 12.0), 20, 20) == (2, 3, 10, 12)
    with pytest.raises(ValueError, match="empty or outside"):
        crop_box_pixels((25, 25, 30, 30), 20, 20)
    for empty in ((5, 5, 5, 9), (5, 5, 9, 5)):  # zero width or height: one line, not PIL's error
        with pytest.raises(ValueError, match="empty or outside"):
            crop_box_pixels(empty, 20, 20)


def test_crop_and_resize_mapping(tmp_path):
    arr = np.full((40, 60, 3), 50, np.uint8)
    arr[10:30, 20:50] = (250, 10, 10)  # the box (20, 10, 50, 30)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, mapping = load_image(tmp_path / "a.png", image_size=24, crop=(20, 10, 50, 30))
    assert torch.allclose(x, torch.tensor([250, 10, 10]).view(3, 1, 1) / 255.0, atol=1e-6)
    assert mapping == (20.0, 10.0, 24 / 30, 24 / 20)
    box = map_boxes(torch.tensor([20.0, 10.0, 50.0, 30.0]), mapping)
    assert torch.allclose(box, torch.tensor([0.0, 0.0, 24.0, 24.0]))
    # no crop: the box maps to scaled source coordinates and its pixels stay red
    x, mapping = load_image(tmp_path / "a.png", image_size=30)
    assert mapping == output_mapping(60, 40, 30)
    x0, y0, x1, y1 = map_boxes(torch.tensor([20.0, 10.0, 50.0, 30.0]), mapping).tolist()
    assert (x0, y0, x1, y1) == (10.0, 7.5, 25.0, 22.5)
    inner = x[:, 9:21, 12:23]
    assert (inner[0] > 0.9).all() and (inner[1] < 0.1).all()
    assert (x[:, :6, :] - 50 / 255).abs().max() < 1e-6


def test_normalize_values_and_roundtrip():
    x = torch.rand(2, 3, 5, 4)
    y = imagenet_normalize(x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(y, (x - mean) / std)
    assert torch.allclose(imagenet_denormalize(y), x, atol=1e-6)
    assert imagenet_normalize(x[0]).shape == (3, 5, 4)  # a single image works too


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_normalize_keeps_dtype(dtype):
    x = torch.rand(2, 3, 4, 4).to(dtype)
    y = imagenet_normalize(x)
    assert y.dtype == dtype
    assert torch.allclose(y.double(), imagenet_normalize(x.double()), atol=0.05)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        imagenet_normalize(torch.rand(2, 4, 3, 3))
    with pytest.raises(TypeError):
        imagenet_normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


@pytest.mark.gpu
def test_normalize_cuda():
    x = torch.rand(2, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
    y = imagenet_normalize(x)
    assert y.device == x.device and y.dtype == torch.bfloat16
    assert torch.allclose(y.float().cpu(), imagenet_normalize(x.float().cpu()), atol=0.05)


def test_uint8_to_float_is_the_float32_reciprocal_product():
    """Every byte value converts to k * float32(1/255), CUDA's way of dividing by a scalar, so that a batch
    converted on a GPU (cached batches) has the bits of the same items converted on the CPU; true division
    differs from it for 126 of the 256 values."""
    k = torch.arange(256, dtype=torch.uint8)
    want = k.float() * torch.tensor(1 / 255, dtype=torch.float32)
    assert torch.equal(uint8_to_float(k), want) and uint8_to_float(k).dtype == torch.float32
    assert uint8_to_float(k)[255] == 1.0 and uint8_to_float(k)[0] == 0.0
    assert (k.float() / 255 != want).sum() == 126  # why the exact division is not used


@pytest.mark.gpu
def test_uint8_to_float_same_bits_on_gpu():
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(uint8_to_float(k.cuda()).cpu(), uint8_to_float(k))


def _open_in_child(path, queue):
    queue.put(open_rgb(path).size)


def test_a_process_forked_while_another_thread_opens_an_image_can_open_images(tmp_path):
    """A DataLoader worker forked while push's PNG threads hold the image-open lock inherited it held, by a
    thread the child does not have: its first open waited forever (a resumed run hung at the push's
    evaluation). The child gets a fresh lock."""
    import multiprocessing

    from protokern.data import transforms

    path = str(tmp_path / "a.png")
    Image.new("RGB", (5, 4)).save(path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with transforms._OPEN_LOCK:  # as a push thread inside Image.open
        child = ctx.Process(target=_open_in_child, args=(path, queue))
        child.start()
        child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=5) == (5, 4)
