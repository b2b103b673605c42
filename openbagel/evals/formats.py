"""Reading the public benchmarks' files, and the questions openbagel asks from them.

The files are the ones users already hold: VLMEvalKit's TSVs (MMBench, MME,
POPE, MMMU: one row per question, images base64-encoded, a repeated image
given as the index of the row that holds it) and MMMU's parquet files from
its dataset card (``image_1`` ... ``image_7`` structs with PNG bytes). Each
benchmark builds its prompt the way BAGEL's own evaluation scripts do
(``eval/vlm/eval/<bench>/`` of the BAGEL repository), so the numbers can be
read beside the published ones.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from openbagel.errors import InvalidInputError
from openbagel.evals.answers import options_of
from openbagel.evals.folders import safe_name

#: BAGEL's instruction after a multiple-choice question (its MMBench and MMMU scripts).
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
#: BAGEL's instruction after a short-answer or yes/no question (its MME, POPE and MMMU scripts).
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass
class Question:
    """One benchmark question, ready to ask.

    Attributes:
        id: the row's ``index`` (TSV) or ``id`` (MMMU parquet), as written in the file.
        body: the question as the model sees it after the images (hint, question, ``A. ...`` option lines).
        instruction: what BAGEL's script appends to it, with its separator (``"\nAnswer with the option's..."``).
        images: the images, in order, as file cells (decoded by :func:`decode_image` when asked).
        options: letter -> option text (empty for yes/no and open questions).
        answer: the right answer as the file gives it (a letter, "yes"/"no", or free text); ``None`` if absent.
        category: the row's category (MMBench, MME subtask, POPE split, MMMU subject).
        meta: other fields a predictions file needs (MME's image name, MMMU's question type).
    """

    id: str
    body: str
    instruction: str
    images: list[object]
    options: dict[str, str] = field(default_factory=dict)
    answer: str | None = None
    category: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def prompt(self, instruction: bool = True) -> str:
        """The text sent to the model: the body and, unless ``instruction=False``, BAGEL's instruction."""
        return self.body + self.instruction if instruction else self.body


def read_rows(path: Path) -> list[dict[str, object]]:
    """The rows of a ``.tsv``, ``.parquet``, ``.jsonl`` or ``.json`` (a list) benchmark file.

    TSV image cells shorter than 65 characters that name another row's index
    are replaced by that row's image (VLMEvalKit stores a repeated image once).

    Raises:
        InvalidInputError: a missing file, an unknown suffix, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"benchmark file {path} not found: pass the file you downloaded with --data")
    suffix = path.suffix.lower()
    try:
        if suffix == ".tsv":
            csv.field_size_limit(sys.maxsize)
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
                rows: list[dict[str, object]] = list(csv.DictReader(f, delimiter="\t"))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        else:
            raise InvalidInputError(
                f"{path}: unknown benchmark file type {suffix!r} (expected .tsv, .parquet, .jsonl or .json)"
            )
    except InvalidInputError:
        raise
    except (UnicodeDecodeError, ValueError, OSError, csv.Error) as e:  # JSON, Arrow (ArrowInvalid is a ValueError)
        raise InvalidInputError(f"{path} could not be read as a {suffix} benchmark file: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InvalidInputError(f"{path}: expected a list of rows (objects)")
    if not rows:
        raise InvalidInputError(f"{path} holds no rows")
    if "image" in rows[0]:
        by_index = {str(r.get("index")): r.get("image") for r in rows}
        for r in rows:
            cell = r.get("image")
            if isinstance(cell, str) and len(cell) <= 64 and cell in by_index and cell != str(r.get("index")):
                r["image"] = by_index[cell]
    return rows


def _cell_bytes(cell: object) -> bytes:
    """The encoded image of a file cell: base64 text, raw bytes, or a parquet image struct (``{"bytes": ...}``).

    Raises:
        ValueError (binascii.Error too): a cell that is none of these.
    """
    data = cell.get("bytes") if isinstance(cell, Mapping) else cell
    if isinstance(data, str):
        data = base64.b64decode(data, validate=False)
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"a cell of type {type(cell).__name__}")
    return bytes(data)


def decode_image(cell: object) -> Image.Image:
    """An RGB image from a file cell (see :func:`_cell_bytes`).

    Raises:
        InvalidInputError: a cell that is none of these or not an image.
    """
    try:
        return Image.open(io.BytesIO(_cell_bytes(cell))).convert("RGB")
    except Exception as e:  # binascii, PIL: all mean a cell that is not an image
        raise InvalidInputError(
            f"an image cell could not be decoded ({type(e).__name__}): is this the benchmark's file?"
        ) from None


def check_images(cells: list[tuple[str, object]]) -> None:
    """Check that every ``(row id, image cell)`` holds a readable image, before any model work.

    Raises:
        InvalidInputError: naming the first row whose image cannot be read.
    """
    for row, cell in cells:
        try:
            with Image.open(io.BytesIO(_cell_bytes(cell))) as img:
                img.verify()
        except Exception as e:  # binascii, PIL, ValueError: all mean a cell that is not an image
            raise InvalidInputError(
                f"row {row}: its image cannot be read ({type(e).__name__}: {e}); fix or drop that row"
            ) from None


def _text(row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value).strip()
    return "" if text.lower() == "nan" else text


def _require(rows: list[dict[str, object]], columns: tuple[str, ...], bench: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise InvalidInputError(
            f"not in the {bench} format: no column {', '.join(missing)} (columns: {', '.join(map(str, rows[0]))})"
        )


def mmbench_questions(rows: list[dict[str, object]]) -> list[Question]:
    """MMBench (VLMEvalKit TSV): ``hint`` (if any), the question, ``A. ...`` lines, BAGEL's instruction."""
    _require(rows, ("index", "question", "image", "A"), "MMBench")
    out = []
    for r in rows:
        if not str(r["index"]).strip().isdigit():
            raise InvalidInputError(f"MMBench row index {r['index']!r} is not a whole number")
        options = options_of(r, "ABCDE")
        lines = [t for t in (_text(r, "hint"), _text(r, "question")) if t]
        lines += [f"{k}. {v}" for k, v in options.items()]
        answer = _text(r, "answer") or None
        if answer is not None and answer not in options:
            raise InvalidInputError(
                f"MMBench row {r['index']}: answer {answer!r} is not one of its options ({', '.join(options)})"
            )
        body, category, meta = "\n".join(lines), _text(r, "category"), {"question": _text(r, "question")}
        instruction = f"\n{MCQ_INSTRUCTION}"
        out.append(Question(str(r["index"]), body, instruction, [r["image"]], options, answer, category, meta))
    return out


def yes_no_questions(rows: list[dict[str, object]], bench: str) -> list[Question]:
    """MME or POPE (VLMEvalKit TSV): the question and BAGEL's short-answer instruction; answers in lower case.

    ``meta["image"]`` is the image's name (``image_path``; else the row index
    of the image), which MME's acc+ groups by.
    """
    _require(rows, ("index", "question", "image", "category"), bench)
    out = []
    for r in rows:
        answer = _text(r, "answer").lower() or None
        if answer not in (None, "yes", "no"):
            raise InvalidInputError(f"{bench} row {r['index']}: answer {answer!r} is not yes or no")
        name = _text(r, "image_path") or str(r["index"])
        if bench == "MME":
            safe_name(_text(r, "category"), "MME category")  # it names a results file
        question = _text(r, "question")
        out.append(
            Question(
                str(r["index"]),
                question,
                f" {SHORT_INSTRUCTION}",
                [r["image"]],
                answer=answer,
                category=_text(r, "category"),
                meta={"image": name, "question": question},
            )
        )
    return out


def _list_cell(value: object, what: str) -> list[object]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise InvalidInputError(f"{what} {value[:80]!r} is not a list") from None
        if not isinstance(parsed, list):
            raise InvalidInputError(f"{what} {value[:80]!r} is not a list")
        return parsed
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def mmmu_questions(rows: list[dict[str, object]]) -> list[Question]:
    """MMMU, from its parquet files (``id``, ``question``, ``options`` as a list text, ``image_1``...)
    or VLMEvalKit's TSV (``index``, ``question``, ``A``..., ``image`` a list text or one base64).

    BAGEL's recipe: every image first (the first one at twice its size), then
    the question with its ``<image k>`` marks left in, ``A. ...`` lines for
    multiple choice, and the instruction for the question type.
    """
    out = []
    for r in rows:
        if "options" in r:  # the dataset card's parquet
            _require(rows, ("id", "question", "options", "question_type"), "MMMU")
            if not (isinstance(r["options"], (list, tuple)) or str(r["options"]).strip().startswith("[")):
                raise InvalidInputError(f"MMMU {r['id']} options {str(r['options'])[:80]!r} is not a list")
            choices = _list_cell(r["options"], f"MMMU {r['id']} options")
            options = {chr(65 + i): str(c).strip() for i, c in enumerate(choices)}
            images = [r[f"image_{k}"] for k in range(1, 8) if r.get(f"image_{k}") is not None]
            qtype = _text(r, "question_type")
            qid = str(r["id"])
        else:  # VLMEvalKit's TSV
            _require(rows, ("index", "question", "image"), "MMMU")
            options = options_of(r)
            images = _list_cell(r["image"], f"MMMU row {r['index']} image")
            qtype = "multiple-choice" if options else "open"
            qid = str(r["index"])
        lines = [_text(r, "question")] + [f"{k}. {v}" for k, v in options.items()]
        out.append(
            Question(
                qid,
                "\n".join(lines).strip(),
                f"\n{MCQ_INSTRUCTION if qtype == 'multiple-choice' else SHORT_INSTRUCTION}",
                images,
                options,
                _text(r, "answer") or None,
                _text(r, "subfield") or _text(r, "category"),
                meta={"question_type": qtype},
            )
        )
    return out
