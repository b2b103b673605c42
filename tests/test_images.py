"""Image reading, conversion and the reference's resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openbagel import InvalidInputError
from openbagel.config import ImageTransformConfig, preset
from openbagel.images import load_image, resize_size, to_pil, to_rgb, to_tensor

VAE = preset("7b-mot").vae_transform
VIT = preset("7b-mot").vit_transform


@pytest.mark.parametrize(
    "size,t,expect",
    [
        ((1500, 700), VAE, (1024, 480)),  # spec examples
        ((4000, 500), VAE, (1024, 128)),
        ((64, 48), VAE, (688, 512)),
        ((64, 48), VIT, (294, 224)),
        ((300, 200), VAE, (768, 512)),
        ((1500, 700), VIT, (980, 462)),
        ((64, 48), ImageTransformConfig(256, 64, 16), (80, 64)),
    ],
)
def test_resize_size(size, t, expect):
    assert resize_size(*size, t) == expect


def test_area_limit_shrinks_linearly():
    t = ImageTransformConfig(max_size=4096, min_size=16, stride=16)
    w, h = resize_size(2000, 2000, t)
    assert w * h <= 14 * 14 * 9 * 1024 and (w, h) == (896, 896)  # 2000 * 0.4516 = 903.2, snapped to 56*16


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb(img))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    img = Image.new("P", (2, 2), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    assert np.asarray(to_rgb(img)).tolist() == [[[255, 255, 255]] * 2, [[255, 255, 255], [0, 255, 0]]]


def test_cmyk_grayscale_and_16bit():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    sixteen = Image.fromarray(np.full((2, 2), 65535 // 2, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (127, 127, 127)  # scaled, not clipped to white


def test_load_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InvalidInputError, match="not an image file"):
        load_image(bad)
    trunc = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(InvalidInputError, match="trunc.png"):
        load_image(trunc)


def test_decompression_bomb_and_odd_modes(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200x200 is then over twice the limit
    with pytest.raises(InvalidInputError, match="too large to open safely"):
        load_image(big)
    monkeypatch.undo()
    la = Image.new("LA", (3, 3), (100, 255))
    assert to_rgb(la).getpixel((0, 0)) == (100, 100, 100)


def test_tensor_mapping():
    img = Image.fromarray(np.array([[[0, 128, 255]]], dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]))
    assert np.asarray(to_pil(t)).tolist() == [[[0, 128, 255]]]
    # 0.0 -> 127.5 -> 127: truncation, as the reference does
    assert np.asarray(to_pil(torch.zeros(3, 1, 1))).tolist() == [[[127, 127, 127]]]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_overlong_path(tmp_path):
    with pytest.raises(InvalidInputError, match="bad image path"):
        load_image(tmp_path / ("a" * 300 + ".png"))


def test_image_bytes(tmp_path):
    import io

    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)  # same rules as files, EXIF included
    with pytest.raises(InvalidInputError, match=r"^not an image file Pillow can read \(UnidentifiedImageError\)$"):
        load_image(b"garbage")


def bad_exif_jpeg() -> bytes:
    """A 693-byte JPEG whose EXIF has Orientation 6 and tag 259 (Compression,
    a number) stored as text: Pillow's ``exif_transpose`` raises ``struct.error``."""
    import io
    import struct

    text = b"x" * 11 + b"\0"
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 259, 2, len(text), 8 + 2 + 24 + 4)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0) + text
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 0, 0)).save(buf, "JPEG", exif=b"Exif\x00\x00" + tiff)
    return buf.getvalue()


def test_malformed_exif_is_ignored_with_a_warning(tmp_path, caplog):
    data = bad_exif_jpeg()
    assert len(data) == 693
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    for source in (data, path):
        caplog.clear()
        img = load_image(source)
        assert img.size == (8, 4) and img.mode == "RGB"  # unrotated (Orientation 6 would give 4x8)
        assert abs(img.getpixel((4, 2))[0] - 200) <= 8  # the pixels, decoded (JPEG: within 8 levels)
        assert "malformed EXIF" in caplog.text


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(InvalidInputError, match="is a folder, not an image file"):
        load_image(tmp_path)
