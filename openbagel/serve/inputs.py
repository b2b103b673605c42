"""Request inputs the server checks itself: uploaded images (size and format
from the header, before decoding), data URLs and ``"WxH"`` sizes."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from openbagel.images import load_image
from openbagel.serve.settings import Limits


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response.

    Attributes:
        status: HTTP status (400, 401, 404, 413...).
        param: the request field at fault, or None.
        code: a short machine-readable code, or None.
        type: OpenAI's error ``type`` (``invalid_request_error`` unless said).
    """

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ):  # fmt: skip
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Uploaded image bytes -> an RGB PIL image, refusing oversized or unsupported files before decoding.

    Raises:
        RequestError: empty data, not an image, a format outside ``limits.image_formats``,
            or more than ``limits.max_image_pixels`` pixels (read from the header).
    """
    if not data:
        raise RequestError(f"{param} is empty", param=param, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (w, h) = img.format, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(
            f"{param} is not an image file ({', '.join(limits.image_formats)} accepted)",
            param=param,
            code="invalid_image",
        ) from None
    except Image.DecompressionBombError:  # Pillow's own guard, from the header too
        raise RequestError(
            f"{param}: the image has more than {limits.max_image_pixels} pixels (the server's limit); resize it first",
            param=param,
            code="image_too_large",
        ) from None
    if fmt not in limits.image_formats:
        raise RequestError(
            f"{param}: image format {fmt} is not accepted; send one of {', '.join(limits.image_formats)}",
            param=param,
            code="invalid_image_format",
        )
    if w * h > limits.max_image_pixels:
        raise RequestError(
            f"{param}: {w}x{h} pixels is more than the server's limit of {limits.max_image_pixels} pixels; "
            "resize the image first",
            param=param,
            code="image_too_large",
        )
    from openbagel.errors import InvalidInputError

    try:
        return load_image(data)
    except InvalidInputError as e:
        raise RequestError(f"{param}: {e}", param=param, code="invalid_image") from None


_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S
)


def decode_data_url(url: str, limits: Limits, param: str) -> Image.Image:
    """A ``data:image/...;base64,...`` URL -> an RGB PIL image.

    Raises:
        RequestError: another URL scheme (the server never fetches from the
            network), a data URL that is not base64 or not an image, or an image
            over the limits of :func:`decode_image`.
    """
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "no scheme"
        raise RequestError(
            f"{param}: only data: URLs with base64 images are accepted (got {scheme[:20]}); "
            "the server does not fetch URLs: send the image as data:image/png;base64,...",
            param=param,
            code="invalid_image_url",
        )
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise RequestError(
            f"{param}: a data URL must be base64 encoded (data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    try:
        data = base64.b64decode(m.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"{param}: the data URL's base64 payload is malformed", param=param, code="invalid_image_url"
        ) from None
    return decode_image(data, limits, param)


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``; the model's own checks (multiples of 16, maximum) come later.

    Raises:
        RequestError: not of the form ``WxH`` with whole numbers.
    """
    m = re.fullmatch(r"\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*", size)
    if m is None:
        raise RequestError(
            f"size must look like 512x512 (width x height in pixels), got {size[:40]!r}",
            param=param,
            code="invalid_value",
        )
    return int(m.group(1)), int(m.group(2))
