"""Clips in and out for next-frame prediction: GIF files (Pillow), MP4 / WebM /
MKV / MOV files (PyAV), or a list of image files; written as GIF, MP4, WebM or
numbered image files.

A clip is a list of RGB PIL images and a frame rate in frames per second.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from openbagel.errors import InvalidInputError
from openbagel.fileio import write_atomically
from openbagel.images import load_image, to_rgb

#: Containers read and written through PyAV, with the video codec used to write them.
VIDEO_CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libx264", ".mov": "libx264"}
#: Frame rate of a clip given as image files (they carry none).
DEFAULT_FPS = 4.0
#: Most frames read from one clip (a guard against decoding a whole film).
MAX_FRAMES = 1000


@dataclass
class Clip:
    """Frames (RGB PIL images of one size) and their rate in frames per second."""

    frames: list[Image.Image]
    fps: float = DEFAULT_FPS


def is_clip_file(path: str | Path) -> bool:
    """Whether the file name is a clip (``.gif`` or a PyAV container) rather than a still image."""
    return Path(path).suffix.lower() in (".gif", *VIDEO_CODECS)


def read_clip(sources: str | Path | Sequence[str | Path]) -> Clip:
    """Read a clip: one GIF / video file, or a list of image files (one frame each,
    in order). Frames of other sizes than the first are refused.

    Raises:
        InvalidInputError: missing or unreadable file, an empty clip, frames of
            different sizes, or more than :data:`MAX_FRAMES` frames.
    """
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    if not paths:
        raise InvalidInputError("no clip given: pass a GIF/MP4/WebM file or a list of image files")
    if len(paths) == 1 and is_clip_file(paths[0]):
        path = paths[0]
        if not path.is_file():
            raise InvalidInputError(f"clip file not found: {str(path)!r}")
        clip = _read_gif(path) if path.suffix.lower() == ".gif" else _read_video(path)
    else:
        if len(paths) > MAX_FRAMES:
            raise InvalidInputError(f"{len(paths)} frames given; at most {MAX_FRAMES}")
        for p in paths:
            if is_clip_file(p):
                raise InvalidInputError(
                    f"{p}: a clip file must come alone; give one GIF/MP4/WebM file, or image files only"
                )
        clip = Clip([load_image(p) for p in paths])
    if not clip.frames:
        raise InvalidInputError(f"{paths[0]}: the clip has no frames")
    check_frame_sizes(clip.frames)
    return clip


def check_frame_sizes(
    frames: Sequence[Image.Image], size: Callable[[Image.Image], tuple[int, int]] | None = None
) -> None:
    """Refuse frames of different sizes; ``size`` maps a frame to the size
    compared (default: its own, ``(width, height)``).

    Raises:
        InvalidInputError: naming the first frame whose size differs from frame 1's.
    """
    size = size or (lambda f: f.size)
    first = size(frames[0])
    for i, f in enumerate(frames[1:], 2):
        if size(f) != first:
            raise InvalidInputError(
                f"frame {i} is {f.width}x{f.height} but frame 1 is {frames[0].width}x{frames[0].height}; "
                "all frames need one size"
            )


def _read_gif(path: Path) -> Clip:
    try:
        with Image.open(path) as img:
            frames, durations = [], []
            for frame in ImageSequence.Iterator(img):
                if len(frames) == MAX_FRAMES:
                    raise InvalidInputError(f"{path}: more than {MAX_FRAMES} frames; cut the clip first")
                durations.append(frame.info.get("duration") or 0)
                frames.append(to_rgb(frame.convert("RGBA")))
    except Image.DecompressionBombError:
        raise InvalidInputError(f"{path}: the frames are too large to open safely; resize the clip first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a GIF Pillow can read ({e.__class__.__name__}: {e})") from None
    ms = sorted(durations)[len(durations) // 2]  # the median frame duration
    return Clip(frames, 1000.0 / ms if ms > 0 else DEFAULT_FPS)


def _read_video(path: Path) -> Clip:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInputError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate
            frames = []
            for frame in container.decode(stream):
                if len(frames) == MAX_FRAMES:
                    raise InvalidInputError(f"{path}: more than {MAX_FRAMES} frames; cut the clip first")
                if frame.width * frame.height > (Image.MAX_IMAGE_PIXELS or 1 << 62):
                    raise InvalidInputError(f"{path}: the frames are too large; resize the clip first")
                frames.append(frame.to_image().convert("RGB"))
    except av.FFmpegError as e:
        raise InvalidInputError(f"{path}: not a video file PyAV can read ({e.__class__.__name__}: {e})") from None
    return Clip(frames, float(rate) if rate else DEFAULT_FPS)


def check_clip_output(path: str | Path) -> None:
    """Refuse an output we could not write, before any compute: a clip file
    (``.gif``, ``.mp4``, ``.webm``, ``.mkv``, ``.mov``) in an existing folder, or
    an existing folder (numbered PNG files go there).

    Raises:
        InvalidInputError: another extension, or a missing or read-only folder.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and not is_clip_file(path):
        raise InvalidInputError(
            f"cannot write a clip to {str(path)!r}: use a .gif, .mp4 or .webm file, or an existing folder for PNG frames"
        )
    if not folder.is_dir():
        raise InvalidInputError(f"output folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"output folder {str(folder)!r} is not writable")


def write_clip(clip: Clip, path: str | Path) -> list[Path]:
    """Write a clip as one file (by extension: GIF, MP4, WebM, MKV, MOV) or, when
    ``path`` is a folder, as ``frame-001.png``, ``frame-002.png``, ... in it.
    Files are written under a temporary name and renamed, so a failure leaves
    no half-written clip. Video codecs need even sizes: odd frame sizes are
    padded by one pixel (edge colour) in video files.

    Returns:
        The files written.
    Raises:
        InvalidInputError: see :func:`check_clip_output`, or the write failed.
    """
    path = Path(path)
    check_clip_output(path)
    if not clip.frames:
        raise InvalidInputError("the clip has no frames to write")
    if path.is_dir():
        written = []
        for i, frame in enumerate(clip.frames, 1):
            written.append(path / f"frame-{i:03d}.png")
            write_atomically(written[-1], lambda tmp, f=frame: f.save(tmp, format="PNG"))
        return written
    if path.suffix.lower() == ".gif":
        ms = max(20, round(100 / clip.fps) * 10)  # GIF keeps frame times in hundredths of a second
        first, *rest = clip.frames
        write_atomically(
            path, lambda tmp: first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=ms, loop=0)
        )
    else:
        write_atomically(path, lambda tmp: _write_video(clip, tmp, path.suffix.lower()))
    return [path]


def _write_video(clip: Clip, tmp: str, suffix: str) -> None:
    import av

    w, h = clip.frames[0].size
    even = (w + w % 2, h + h % 2)
    fmt = {".mp4": "mp4", ".webm": "webm", ".mkv": "matroska", ".mov": "mov"}[suffix]
    with av.open(tmp, mode="w", format=fmt) as container:
        stream = container.add_stream(VIDEO_CODECS[suffix], rate=Fraction(clip.fps).limit_denominator(1000))
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        for frame in clip.frames:
            if frame.size != even:  # repeat the last column / row
                frame = Image.fromarray(np.pad(np.asarray(frame), ((0, even[1] - h), (0, even[0] - w), (0, 0)), "edge"))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
