"""Request inputs the server checks itself: uploaded images (size and format
from the header, before decoding), data URLs and ``"WxH"`` sizes."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Upload:
    """An uploaded image whose header was checked; its pixels are decoded only
    by :meth:`decode`, once the request holds an engine slot.

    Attributes:
        data: the file's bytes.
        param: the request field it came in (for error messages).
        width, height: from the header, in pixels.
    """

    data: bytes
    param: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode(self) -> Image.Image:
        """The RGB PIL image (EXIF rotation applied, :func:`~openbagel.images.load_image`).

        Raises:
            RequestError: the pixel data is broken although the header was fine.
        """
        from openbagel.errors import InvalidInputError

        try:
            return load_image(self.data)
        except InvalidInputError as e:
            raise RequestError(f"{self.param}: {e}", param=self.param, code="invalid_image") from None


def check_image(data: bytes, limits: Limits, param: str) -> Upload:
    """Uploaded image bytes -> an :class:`Upload`, from the file header only (no pixel is decoded).

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
    return Upload(data, param, w, h)


def check_total_pixels(uploads: list[Upload], limits: Limits, param: str) -> None:
    """The images of one request hold at most ``limits.max_image_pixels`` pixels in all.

    Raises:
        RequestError: over the limit (``param`` names the field that holds the images).
    """
    total = sum(u.pixels for u in uploads)
    if total > limits.max_image_pixels:
        sizes = ", ".join(f"{u.width}x{u.height}" for u in uploads)
        raise RequestError(
            f"the request's images ({sizes}) have {total} pixels in all, more than the server's limit of "
            f"{limits.max_image_pixels} pixels per request; send smaller or fewer images",
            param=param,
            code="image_too_large",
        )


_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S
)


def check_data_url(url: str, limits: Limits, param: str) -> Upload:
    """A ``data:image/...;base64,...`` URL -> an :class:`Upload` (header checked, pixels not decoded).

    Raises:
        RequestError: another URL scheme (the server never fetches from the
            network), a data URL that is not base64 or not an image, or an image
            over the limits of :func:`check_image`.
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
    return check_image(data, limits, param)


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
