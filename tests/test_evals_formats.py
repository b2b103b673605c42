"""Readers of the public benchmarks' files, on small files written in their formats by the tests."""

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from openbagel.errors import InvalidInputError
from openbagel.evals.formats import (
    MCQ_INSTRUCTION,
    SHORT_INSTRUCTION,
    decode_image,
    mmbench_questions,
    mmmu_questions,
    read_rows,
    yes_no_questions,
)


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(color) -> str:
    return base64.b64encode(png(color)).decode()


def write_tsv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def test_mmbench_tsv_rows_prompts_and_shared_images(tmp_path):
    rows = [
        {
            "index": 7,
            "question": "What colour?",
            "hint": "",
            "A": "red",
            "B": "blue",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "colour",
            "image": b64("red"),
        },
        # the circular copy: options rotated, the image given as the original row's index
        {
            "index": 1000007,
            "question": "What colour?",
            "hint": "A picture.",
            "A": "blue",
            "B": "red",
            "C": "",
            "D": "",
            "answer": "B",
            "category": "colour",
            "image": "7",
        },
    ]
    qs = mmbench_questions(read_rows(write_tsv(tmp_path / "mmb.tsv", rows)))
    assert [q.id for q in qs] == ["7", "1000007"]
    assert qs[0].prompt() == f"What colour?\nA. red\nB. blue\n{MCQ_INSTRUCTION}"
    assert qs[1].prompt() == f"A picture.\nWhat colour?\nA. blue\nB. red\n{MCQ_INSTRUCTION}"
    assert qs[1].prompt(instruction=False) == "A picture.\nWhat colour?\nA. blue\nB. red"
    assert qs[1].options == {"A": "blue", "B": "red"} and qs[1].answer == "B" and qs[1].category == "colour"
    assert decode_image(qs[1].images[0]).getpixel((0, 0)) == (255, 0, 0)  # the shared image resolved


def test_yes_no_tsv_lowercases_answers_and_names_images(tmp_path):
    rows = [
        {
            "index": 0,
            "image": b64("white"),
            "question": "Is there a circle?",
            "answer": "Yes",
            "category": "existence",
            "image_path": "a.png",
        },
        {
            "index": 1,
            "image": "0",
            "question": "Is there a square?",
            "answer": "No",
            "category": "existence",
            "image_path": "a.png",
        },
    ]
    qs = yes_no_questions(read_rows(write_tsv(tmp_path / "mme.tsv", rows)), "MME")
    assert [q.answer for q in qs] == ["yes", "no"]
    assert qs[0].prompt() == f"Is there a circle? {SHORT_INSTRUCTION}"
    assert qs[0].prompt(instruction=False) == "Is there a circle?"
    assert qs[1].meta == {"image": "a.png", "question": "Is there a square?"}
    rows[1]["answer"] = "Maybe"
    with pytest.raises(InvalidInputError, match="is not yes or no"):
        yes_no_questions(read_rows(write_tsv(tmp_path / "bad.tsv", rows)), "MME")


def test_mmmu_parquet_and_tsv(tmp_path):
    table = pa.table(
        {
            "id": ["validation_Art_1", "validation_Art_2"],
            "question": ["<image 1> Which style?", "How many? <image 1>"],
            "options": ["['Baroque', 'Cubism']", "[]"],
            "answer": ["B", "3"],
            "question_type": ["multiple-choice", "open"],
            "subfield": ["Art History", "Art History"],
            "image_1": [{"bytes": png("blue"), "path": "x.png"}, {"bytes": png("green"), "path": "y.png"}],
            "image_2": [None, {"bytes": png("red"), "path": "z.png"}],
        }
    )
    pq.write_table(table, tmp_path / "art.parquet")
    qs = mmmu_questions(read_rows(tmp_path / "art.parquet"))
    assert qs[0].prompt() == f"<image 1> Which style?\nA. Baroque\nB. Cubism\n{MCQ_INSTRUCTION}"
    assert qs[0].options == {"A": "Baroque", "B": "Cubism"} and len(qs[0].images) == 1
    assert qs[1].prompt() == f"How many? <image 1>\n{SHORT_INSTRUCTION}" and qs[1].meta["question_type"] == "open"
    assert [decode_image(c).getpixel((0, 0)) for c in qs[1].images] == [(0, 128, 0), (255, 0, 0)]

    rows = [
        {
            "index": 3,
            "question": "Pick <image 1>",
            "A": "x",
            "B": "y",
            "answer": "A",
            "category": "Art",
            "image": str([b64("red"), b64("blue")]),
        }
    ]
    (q,) = mmmu_questions(read_rows(write_tsv(tmp_path / "mmmu.tsv", rows)))
    assert len(q.images) == 2 and q.options == {"A": "x", "B": "y"} and q.category == "Art"


def test_bad_files_are_named(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        read_rows(tmp_path / "nope.tsv")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InvalidInputError, match="unknown benchmark file type"):
        read_rows(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInputError, match="holds no rows"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "pope.jsonl").write_text(json.dumps({"question_id": 1, "text": "q"}) + "\n")
    with pytest.raises(InvalidInputError, match="not in the MMBench format: no column index, question, image, A"):
        mmbench_questions(read_rows(tmp_path / "pope.jsonl"))
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        decode_image("bm90IGFuIGltYWdl")
