"""Write the shapes world in the trainer's file formats, for use with any
trainer that reads them (or to inspect the data): ``t2i.parquet``
(``image`` bytes + ``caption`` list), ``edit.parquet`` (``images`` +
``instructions``: edits, style edits and next-frame clips), ``chat.jsonl``
(LLaVA conversations, images under ``images/``). Thinking samples have no
file format of their own and stay in memory."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

from openbagel.shapes.world import IMAGE_SIZE, make_record


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_datasets(
    folder: str | Path, count: int = 1000, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE
) -> dict[str, int]:
    """Write ``count`` records of each of text to image, questions and edits
    (a third of the edits are style edits, a third clips) to ``folder``.
    Returns the number of rows per file. Files are written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t2i, edits, chats = [], [], []
    for i in range(count):
        r = make_record("t2i", rng, split, size)
        t2i.append({"image": _png(r["image"]), "caption": r["caption"]})
        r = make_record(("edit", "style", "clip")[i % 3], rng, split, size)
        edits.append({"images": [_png(x) for x in r["images"]], "instructions": r["instructions"]})
        r = make_record("qa", rng, split, size)
        name = f"images/{i:06d}.png"
        r["images"][0].save(folder / name)
        conv = [{"from": role, "value": text} for role, text in r["turns"]]
        chats.append({"image": name, "conversations": conv})
    for name, rows in (("t2i.parquet", t2i), ("edit.parquet", edits)):
        tmp = folder / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(folder / name)
    tmp = folder / ".chat.jsonl.tmp"
    tmp.write_text("".join(json.dumps(c) + "\n" for c in chats))
    tmp.replace(folder / "chat.jsonl")
    return {"t2i.parquet": len(t2i), "edit.parquet": len(edits), "chat.jsonl": len(chats)}
