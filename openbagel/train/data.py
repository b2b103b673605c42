"""Training data: readers for the supported formats, turning records into
samples of splits (see :mod:`openbagel.train.packing`).

Formats:

* text-to-image parquet: ``image`` (bytes) + ``caption`` (str, list of
  alternatives, or dict of alternatives) -- or the reference trainer's
  ``captions`` (a JSON dict of alternatives);
* editing parquet: ``images`` (list of bytes) + ``instructions`` (list of
  str; instruction i turns image i into image i+1) -- or the reference's
  ``image_list`` + ``instruction_list`` (alternatives per step);
* understanding / chat JSONL in the LLaVA style: ``{"image": path | [paths],
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from":
  "gpt", "value": "..."}]}``, image paths relative to the JSONL file (rows
  with a ``video`` or ``videos`` field or a ``<video>`` tag are refused: give the frames as images);
* any Python iterable of such records (:class:`RecordSource`), for procedural data.

Every record error names the file and the row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from openbagel.config import BagelConfig
from openbagel.errors import OpenBagelError
from openbagel.images import load_image, resize, to_tensor
from openbagel.tokenizer import Tokenizer
from openbagel.train.packing import ImageSplit, Sample, TextSplit


class DataError(OpenBagelError):
    """A record that cannot be used, with the file and row it came from."""

    def __init__(self, source: str, row: int | str, message: str):
        super().__init__(f"{source}, row {row}: {message}")
        self.source, self.row = source, row


@dataclass
class SampleBuilder:
    """Turns records into samples: tokenizes text and resizes images for each path."""

    config: BagelConfig
    tokenizer: Tokenizer

    def text(self, text: str, **kw) -> TextSplit:
        return TextSplit(self.tokenizer.encode(text), **kw)

    def vae(self, image: Image.Image, **kw) -> ImageSplit:
        return ImageSplit(to_tensor(resize(image, self.config.vae_transform)), "vae", **kw)

    def vit(self, image: Image.Image, **kw) -> ImageSplit:
        # the reference resizes for the VAE path first, then for the ViT path
        vae_sized = resize(image, self.config.vae_transform)
        return ImageSplit(to_tensor(resize(vae_sized, self.config.vit_transform)), "vit", **kw)

    def text_to_image(self, caption: str, image: Image.Image) -> Sample:
        """``[caption (condition), image to generate]``."""
        return [self.text(caption, condition=True), self.vae(image, loss=True)]

    def edit_chain(self, images: list[Image.Image], instructions: list[str]) -> Sample:
        """``image_0 (VAE + ViT), instruction_0, image_1 to generate, image_1 clean (VAE + ViT), ...``.

        The clean copy of a generated image sits at the generated one's rotary
        position (an image to generate does not advance the counter).
        """
        sample: Sample = [self.vae(images[0], condition=True), self.vit(images[0], condition=True)]
        for k, instruction in enumerate(instructions):
            sample += [self.text(instruction, condition=True), self.vae(images[k + 1], loss=True)]
            if k + 1 < len(instructions):
                sample += [self.vae(images[k + 1]), self.vit(images[k + 1])]
        return sample

    def reasoned_image(self, prompt: str, plan: str, image: Image.Image) -> Sample:
        """Thinking before generating: ``[thinking system prompt, prompt (condition),
        "<think>plan</think>" (loss), image to generate]``, the context that
        ``text_to_image(..., think=True)`` builds at inference."""
        from openbagel.pipeline import THINK_GENERATE_PROMPT

        return [
            self.text(THINK_GENERATE_PROMPT),
            self.text(prompt, condition=True),
            self.text(f"<think>{plan}</think>", loss=True),
            self.vae(image, loss=True),
        ]

    def conversation(self, images: list[Image.Image], turns: list[tuple[str, str]]) -> Sample:
        """LLaVA-style turns; ``<image>`` marks where each image goes (ViT path).
        Assistant turns carry the loss."""
        sample: Sample = []
        pending = list(images)
        for role, value in turns:
            parts = value.split("<image>")
            for i, part in enumerate(parts):
                if i > 0:
                    if not pending:
                        raise ValueError("more <image> tags than images")
                    sample.append(self.vit(pending.pop(0)))
                part = part.strip()
                if part:
                    sample.append(self.text(part, loss=role == "gpt"))
        if pending:  # images without a tag go first, as LLaVA does
            sample = [self.vit(img) for img in pending] + sample
        return sample


def _bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"expected image bytes, got {type(data).__name__}")
    return data


def _choose(value, rng: random.Random, what: str) -> str:
    """One text out of a string, a list of alternatives or a dict of alternatives (also JSON-encoded)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        value = [v for v in value if isinstance(v, str)]
        if not value:
            raise ValueError(f"{what} has no text alternatives")
        value = rng.choice(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    return value


OnError = Callable[[DataError], None] | None


def _report(err: DataError, on_error: OnError) -> None:
    """Raise ``err``, or hand it to ``on_error`` (skip the row) when given."""
    if on_error is None:
        raise err
    on_error(err)


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types
        raise DataError(str(path), "-", f"not a readable parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)  # rows counted from 1, like JSONL lines


def read_text_to_image(
    path: str | Path, builder: SampleBuilder, rng: random.Random, on_error: OnError = None
) -> Iterator[Sample]:
    """Samples of a text-to-image parquet file (``image`` + ``caption`` or ``captions``).

    A bad row raises :class:`DataError`, or is passed to ``on_error`` and skipped.
    """
    path = Path(path)
    for i, row in _rows(path):
        try:
            if "image" not in row or ("caption" not in row and "captions" not in row):
                raise ValueError(f"needs the columns 'image' and 'caption' (or 'captions'); has {sorted(row)}")
            caption = _choose(row.get("caption", row.get("captions")), rng, "caption")
            yield builder.text_to_image(caption, load_image(_bytes(row["image"])))
        except (ValueError, OpenBagelError) as e:
            _report(DataError(str(path), i, str(e)), on_error)


def read_edit(
    path: str | Path, builder: SampleBuilder, rng: random.Random, on_error: OnError = None
) -> Iterator[Sample]:
    """Samples of an editing parquet file (``images`` + ``instructions``, or the
    reference's ``image_list`` + ``instruction_list``)."""
    path = Path(path)
    for i, row in _rows(path):
        try:
            images = row.get("images", row.get("image_list"))
            instructions = row.get("instructions", row.get("instruction_list"))
            if images is None or instructions is None:
                raise ValueError(f"needs the columns 'images' and 'instructions'; has {sorted(row)}")
            if not isinstance(images, list) or not isinstance(instructions, list):
                raise ValueError("'images' and 'instructions' must be lists")
            if len(images) < 2:
                raise ValueError(f"an edit row needs at least 2 images (before and after), got {len(images)}")
            if len(instructions) != len(images) - 1:
                raise ValueError(f"{len(images)} images need {len(images) - 1} instructions, got {len(instructions)}")
            texts = [_choose(t, rng, f"instruction {k}") for k, t in enumerate(instructions)]
            yield builder.edit_chain([load_image(_bytes(b)) for b in images], texts)
        except (ValueError, OpenBagelError) as e:
            _report(DataError(str(path), i, str(e)), on_error)


def read_conversations(path: str | Path, builder: SampleBuilder, on_error: OnError = None) -> Iterator[Sample]:
    """Samples of a LLaVA-style JSONL file (images relative to the file)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), "-", f"cannot be read ({e})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                raise ValueError("needs a 'conversations' list")
            names = record.get("image", [])
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("'image' must be a path or a list of paths")
            images = [load_image(path.parent / n) for n in names]
            turns = []
            for turn in record["conversations"]:
                if (
                    not isinstance(turn, dict)
                    or turn.get("from") not in ("human", "gpt")
                    or not isinstance(turn.get("value"), str)
                ):
                    raise ValueError("each turn needs 'from' (human or gpt) and a text 'value'")
                turns.append((turn["from"], turn["value"]))
            if {"video", "videos"} & set(record) or any("<video>" in value.lower() for _, value in turns):
                # not dropped in silence: the clip would be lost and <video> trained as text
                raise ValueError(
                    "video rows ('video', 'videos', <video>) are not supported; give the frames as 'image' "
                    "files with one <image> tag each, or skip such rows with --skip-bad-rows"
                )
            yield builder.conversation(images, turns)
        except (ValueError, OpenBagelError) as e:
            _report(DataError(str(path), i, str(e)), on_error)


class RecordSource:
    """Samples from any iterable of records with PIL images, for data generated
    in memory: ``{"kind": "t2i", "caption", "image"}``, ``{"kind": "edit",
    "images", "instructions"}``, ``{"kind": "chat", "images", "turns"}``,
    ``{"kind": "think", "prompt", "plan", "image"}``."""

    def __init__(self, records: Callable[[], Iterable[dict]], builder: SampleBuilder, rng: random.Random):
        self.records, self.builder, self.rng = records, builder, rng

    def __iter__(self) -> Iterator[Sample]:
        for i, r in enumerate(self.records()):
            try:
                kind = r.get("kind")
                if kind == "t2i":
                    yield self.builder.text_to_image(_choose(r["caption"], self.rng, "caption"), load_image(r["image"]))
                elif kind == "edit":
                    yield self.builder.edit_chain([load_image(x) for x in r["images"]], list(r["instructions"]))
                elif kind == "chat":
                    yield self.builder.conversation([load_image(x) for x in r.get("images", [])], list(r["turns"]))
                elif kind == "think":
                    yield self.builder.reasoned_image(r["prompt"], r["plan"], load_image(r["image"]))
                else:
                    raise ValueError(f"unknown record kind {kind!r} (t2i, edit, chat or think)")
            except (KeyError, ValueError, OpenBagelError) as e:
                raise DataError("records", i, str(e)) from None
