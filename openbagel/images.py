"""Image input and output: reading, RGB conversion, the reference's resize, and
pixel <-> tensor mapping (spec section 4; golden case 6)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from openbagel.config import ImageTransformConfig
from openbagel.errors import InvalidInputError

log = logging.getLogger(__name__)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image file, or the bytes of one (or pass a PIL image through),
    and convert it with :func:`to_rgb`.

    Raises:
        InvalidInputError: the file does not exist or is not an image Pillow can read.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        path, opened = None, io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = opened = Path(source)
        try:
            is_file = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise InvalidInputError(f"bad image path {str(path)[:80]!r}...: {e.strerror}") from None
        if path.is_dir():
            raise InvalidInputError(f"{str(path)!r} is a folder, not an image file; give the path of an image file")
        if not is_file:
            raise InvalidInputError(f"image file not found: {str(path)!r}")
    else:
        raise InvalidInputError(f"expected an image path, image bytes or a PIL image, got {type(source).__name__}")
    try:
        with Image.open(opened) as img:
            img.load()
            return to_rgb(_upright(img, path))
    except Image.DecompressionBombError:
        where = f"{path}: " if path else ""
        raise InvalidInputError(
            f"{where}the image is too large to open safely (over {Image.MAX_IMAGE_PIXELS} pixels); resize it first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if path is None:  # bytes: Pillow's message only names a BytesIO object
            raise InvalidInputError(f"not an image file Pillow can read ({e.__class__.__name__})") from None
        raise InvalidInputError(f"{path}: not an image file Pillow can read ({e.__class__.__name__}: {e})") from None


def _upright(img: Image.Image, path: Path | None) -> Image.Image:
    """The image as it is displayed: camera photos store their rotation in
    EXIF (the reference ignores it). A malformed EXIF block (Pillow raises
    while rewriting it, e.g. ``struct.error`` for a numeric tag stored as
    text) is ignored with a warning: the image is used unrotated."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # any flaw of the metadata: the pixels are already loaded
        where = f"{path}: " if path else ""
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        log.warning("%smalformed EXIF block (%s: %s); using the image unrotated", where, kind, e)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the reference converts it: RGBA, or any image with a ``transparency``
    entry, is composited on white; other modes use Pillow's ``convert("RGB")``
    (CMYK, grayscale, palette, LA/PA lose alpha).

    One improvement over the reference: 16-bit integer images are scaled to 8
    bits (the reference clips them, which turns most of them white); a warning says so.

    Raises:
        InvalidInputError: an empty image, or a mode Pillow cannot convert.
    """
    if img.width < 1 or img.height < 1:
        raise InvalidInputError(f"the image is empty ({img.width}x{img.height} pixels)")
    try:
        return _to_rgb(img)
    except ValueError as e:
        raise InvalidInputError(f"cannot convert an image of mode {img.mode!r} to RGB ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) > 255:
            log.warning("16-bit image scaled to 8 bits (the reference implementation would clip it)")
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _snap(v: float, stride: int) -> int:
    return max(stride, int(round(v / stride) * stride))


def resize_size(width: int, height: int, t: ImageTransformConfig) -> tuple[int, int]:
    """Output ``(width, height)`` of the reference's aspect-preserving resize.

    In order: scale the long side down to ``max_size`` (never up), then the
    short side up to ``min_size`` (this wins); round (half to even) and snap
    each side to a multiple of ``stride``; if the area exceeds ``max_pixels``
    multiply both sides by the area ratio (linearly, as the reference does)
    and snap again; if the long side still exceeds ``max_size``, scale it to
    ``max_size`` and snap again (this last step wins).
    """
    scale = min(t.max_size / max(width, height), 1.0)
    scale = max(scale, t.min_size / min(width, height))
    w, h = _snap(round(width * scale), t.stride), _snap(round(height * scale), t.stride)
    if w * h > t.max_pixels:
        s = t.max_pixels / (w * h)
        w, h = _snap(w * s, t.stride), _snap(h * s, t.stride)
    if max(w, h) > t.max_size:
        s = t.max_size / max(w, h)
        w, h = _snap(w * s, t.stride), _snap(h * s, t.stride)
    return w, h


def resize(img: Image.Image, t: ImageTransformConfig) -> Image.Image:
    """Resize with :func:`resize_size` and PIL bicubic resampling."""
    size = resize_size(img.width, img.height, t)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB image -> ``[3, H, W]`` float32 in [-1, 1] (``x/255``, then ``(x-0.5)/0.5``)."""
    arr = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def to_pil(pixels: Tensor) -> Image.Image:
    """``[3, H, W]`` float in about [-1, 1] -> RGB image, as the reference does:
    ``(x*0.5 + 0.5).clamp(0, 1) * 255`` truncated to 8 bits."""
    arr = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8)
    return Image.fromarray(arr.cpu().numpy(), "RGB")
