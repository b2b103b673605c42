"""Training data readers: formats, samples, and errors naming file and row."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from openbagel.config import preset
from openbagel.tokenizer import Tokenizer
from openbagel.train.data import (
    DataError,
    RecordSource,
    SampleBuilder,
    read_conversations,
    read_edit,
    read_text_to_image,
)
from openbagel.train.packing import ImageSplit, TextSplit, pack


@pytest.fixture(scope="module")
def builder(tiny_dir):
    return SampleBuilder(preset("tiny-golden"), Tokenizer.from_folder(tiny_dir))


def png(color=(255, 0, 0), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_text_to_image_formats(tmp_path, builder):
    ours = write_parquet(tmp_path / "t2i.parquet", [{"image": png(), "caption": "a red card"}])
    ref = write_parquet(
        tmp_path / "ref.parquet", [{"image": png(), "captions": json.dumps({"short": "red", "long": "red"})}]
    )
    [sample] = list(read_text_to_image(ours, builder, random.Random(0)))
    text, image = sample
    assert isinstance(text, TextSplit) and text.condition and text.ids == list(b"a red card")
    assert isinstance(image, ImageSplit) and image.loss and image.pixels.shape == (3, 64, 80)  # 64x48 -> 80x64
    [ref_sample] = list(read_text_to_image(ref, builder, random.Random(0)))
    assert ref_sample[0].ids == list(b"red")


def test_edit_chain(tmp_path, builder):
    path = write_parquet(
        tmp_path / "edit.parquet",
        [
            {
                "images": [png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))],
                "instructions": ["make it green", "now blue"],
            }
        ],
    )
    [sample] = list(read_edit(path, builder, random.Random(0)))
    kinds = [(type(s).__name__, getattr(s, "path", None), s.loss) for s in sample]
    assert kinds == [
        ("ImageSplit", "vae", False),
        ("ImageSplit", "vit", False),
        ("TextSplit", None, False),
        ("ImageSplit", "vae", True),
        ("ImageSplit", "vae", False),
        ("ImageSplit", "vit", False),
        ("TextSplit", None, False),
        ("ImageSplit", "vae", True),
    ]
    batch = pack([sample], builder.config, builder.tokenizer.special)
    # the clean copy of image 1 sits at the rotary position of its generated version
    lens = batch.split_lens[0]
    starts = [sum(lens[:k]) for k in range(len(lens))]
    assert batch.position_ids[starts[3]] == batch.position_ids[starts[4]]


def test_conversations(tmp_path, builder):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    line = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(line) + "\n")
    [sample] = list(read_conversations(tmp_path / "chat.jsonl", builder))
    assert [type(s).__name__ for s in sample] == ["ImageSplit", "TextSplit", "TextSplit"]
    assert sample[0].path == "vit" and sample[0].pixels.shape == (3, 70, 84)
    assert not sample[1].loss and sample[2].loss and sample[2].ids == list(b"A box.")


@pytest.mark.parametrize(
    "rows,reader,message",
    [
        ([{"image": png()}], read_text_to_image, "row 1: needs the columns 'image' and 'caption'"),
        ([{"image": b"not an image", "caption": "x"}], read_text_to_image, "row 1: .*not an image file"),
        (
            [{"images": [png(), png()], "instructions": ["a", "b"]}],
            read_edit,
            "row 1: 2 images need 1 instructions, got 2",
        ),
    ],
)
def test_bad_parquet_rows(tmp_path, builder, rows, reader, message):
    path = write_parquet(tmp_path / "bad.parquet", [{"image": png(), "caption": "ok"}] * 0 + rows)
    with pytest.raises(DataError, match=f"bad.parquet, {message}"):
        list(reader(path, builder, random.Random(0)))


def test_bad_jsonl_and_skipping(tmp_path, builder):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl, row 2: not JSON"):
        list(read_conversations(tmp_path / "c.jsonl", builder))
    skipped = []
    samples = list(read_conversations(tmp_path / "c.jsonl", builder, on_error=skipped.append))
    assert len(samples) == 2 and [e.row for e in skipped] == [2]
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(read_edit(tmp_path / "c.jsonl", builder, random.Random(0)))


def test_video_rows_are_refused_with_their_number(tmp_path, builder):
    """A LLaVA-Video row (a 'video' field, <video> in a later turn) is refused,
    never trained with the clip dropped and <video> as literal text."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "ok"}]
    good = {"image": "a.png", "conversations": turns}
    video = {
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "Hello."},
            {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "A ball rolls."},
        ],
    }
    tag_only = {"conversations": [{"from": "human", "value": "<video> what?"}, {"from": "gpt", "value": "x"}]}
    plural = {"videos": ["clip.mp4"], "conversations": turns[:1] + [{"from": "gpt", "value": "<VIDEO>"}]}
    rows = [good, video, good, tag_only, plural]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"v.jsonl, row 2: video rows \('video', 'videos', <video>\) are not supported"):
        list(read_conversations(tmp_path / "v.jsonl", builder))
    skipped = []
    samples = list(read_conversations(tmp_path / "v.jsonl", builder, on_error=skipped.append))
    assert len(samples) == 2 and [e.row for e in skipped] == [2, 4, 5]


def test_record_source(builder):
    records = lambda: [  # noqa: E731
        {"kind": "t2i", "caption": ["a", "b"], "image": Image.new("RGB", (32, 32))},
        {"kind": "chat", "images": [Image.new("RGB", (32, 32))], "turns": [("human", "<image> what"), ("gpt", "x")]},
    ]
    samples = list(RecordSource(records, builder, random.Random(0)))
    assert len(samples) == 2 and samples[0][1].loss and samples[1][0].path == "vit"
    with pytest.raises(DataError, match="records, row 0: unknown record kind"):
        list(RecordSource(lambda: [{"kind": "video"}], builder, random.Random(0)))
