"""Small benchmark files of the shapes world, written in the public benchmarks' formats.

They let every path of ``openbagel eval mmbench|mme|pope|mmmu`` run offline
on the embedded model (tests, a first try before the real data): the same
columns, the same image encoding (base64 in TSVs, a shared image given by
its row index, PNG structs in parquet), MMBench's circular copies, MME's two
questions per image. The questions are the world's own (colour, shape,
existence, count), so the embedded model can answer them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
from pathlib import Path

from openbagel.evals.scores import CIRCULAR_OFFSET
from openbagel.shapes import world


def _png(scene: world.Scene) -> bytes:
    buf = io.BytesIO()
    world.render(scene).save(buf, "PNG")
    return buf.getvalue()


def _write_tsv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _choices(rng: random.Random, right: str, pool: list[str], n: int = 4) -> list[str]:
    options = [right, *rng.sample([p for p in pool if p != right], n - 1)]
    rng.shuffle(options)
    return options


def write_shapes_benchmarks(folder: Path, count: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write ``count`` questions per benchmark into ``folder``.

    Files: ``MMBench_shapes.tsv`` (colour, shape and background questions with
    3 or 4 options, each with its circular copies), ``MME_shapes.tsv`` (existence, two questions
    per image: one yes, one no), ``POPE_shapes.tsv`` (existence, splits
    ``random``/``adversarial``), ``MMMU_shapes.parquet`` (multiple choice on
    shapes, and open counting questions, as MMMU's dataset card stores them),
    ``GenEval_shapes.jsonl`` (GenEval's metadata lines: single objects, colours, counts),
    ``GEdit_shapes.parquet`` (GEdit-Bench's columns), ``ImgEdit_shapes.json`` with its
    originals in ``imgedit_originals/`` (ImgEdit's basic_edit.json), ``WISE_shapes.json``
    (WISE's prompt list; captions of the world).

    Returns:
        benchmark name -> file path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, "all") for _ in range(count)]
    images = [_png(s) for s in scenes]
    b64 = [base64.b64encode(p).decode() for p in images]

    pools = {"colour": list(world.COLORS), "shape": list(world.SHAPES), "background": list(world.BACKGROUNDS)}
    mmbench: list[dict[str, object]] = []
    for i, (scene, image) in enumerate(zip(scenes, b64), start=1):
        asked = {k: (q, a) for q, a, k in world.questions(scene, rng, "all")}
        kind = ("colour", "shape", "background")[i % 3]
        kind = kind if kind in asked else "background"  # a scene may have no object of a unique shape/colour
        question, right = asked[kind]
        options = _choices(rng, right, pools[kind], n=3 if kind == "background" else 4)
        for r in range(len(options)):  # VLMEvalKit's rotations: option k of copy r is option k + r of the original
            rotated = options[r:] + options[:r]
            mmbench.append(
                {
                    "index": i + r * CIRCULAR_OFFSET,
                    "question": question,
                    "hint": "",
                    **dict(zip("ABCD", rotated + [""] * (4 - len(rotated)))),
                    "answer": "ABCD"[rotated.index(right)],
                    "category": kind,
                    "image": image if r == 0 else str(i),
                }  # fmt: skip
            )

    mme, pope = [], []
    for i, (scene, image) in enumerate(zip(scenes, b64)):
        present = rng.choice(scene.objects)
        absent = next(
            (c, s)
            for c in rng.sample(list(world.COLORS), len(world.COLORS))
            for s in world.SHAPES
            if not any(o.color == c and o.shape == s for o in scene.objects)
        )
        pairs = [((present.color, present.shape), "Yes"), (absent, "No")]
        for k, ((color, shape), answer) in enumerate(pairs):
            q = f"Is there {world.article(color)} {color} {shape}?"  # the world's phrasing
            mme.append({"index": 2 * i + k, "image": image if k == 0 else str(2 * i), "question": q,
                        "answer": answer, "category": "existence", "image_path": f"{i}.png"})  # fmt: skip
        (color, shape), answer = pairs[i % 2]
        pope.append({"index": i, "image": image, "question": f"Is there {world.article(color)} {color} {shape}?",
                     "answer": answer, "category": ("random", "adversarial")[(i // 2) % 2]})  # fmt: skip

    mmmu = {"id": [], "question": [], "options": [], "answer": [], "question_type": [], "subfield": [],
            "image_1": []}  # fmt: skip
    for i, (scene, png) in enumerate(zip(scenes, images), start=1):
        mmmu["id"].append(f"validation_Shapes_{i}")
        mmmu["subfield"].append("Shapes")
        mmmu["image_1"].append({"bytes": png, "path": f"{i}.png"})
        qa = {kind: (q, a) for q, a, kind in world.questions(scene, rng, "all")}
        if i % 2 and "shape" in qa:
            (question, right) = qa["shape"]
            options = _choices(rng, right, pools["shape"])
            mmmu["question"].append(f"<image 1> {question}")
            mmmu["options"].append(str(options))
            mmmu["answer"].append("ABCD"[options.index(right)])
            mmmu["question_type"].append("multiple-choice")
        else:
            question, right = next((q, a) for q, a, kind in world.questions(scene, rng, "all") if kind == "count")
            mmmu["question"].append(f"<image 1> {question}")
            mmmu["options"].append("[]")
            mmmu["answer"].append(right)
            mmmu["question_type"].append("open")
    pq.write_table(pa.table(mmmu), folder / "MMMU_shapes.parquet")
    geneval = []
    for i in range(count):  # GenEval's tags and `include` lists, from the world's own caption forms
        color, shape = rng.choice(list(world.COLORS)), rng.choice(world.SHAPES)
        n = rng.choice((2, 3, 4))
        tag, prompt, include = (
            ("single_object", f"a {shape}", [{"class": shape, "count": 1}]),
            ("colors", f"a {color} {shape}", [{"class": shape, "count": 1, "color": color}]),
            ("counting", f"{world.NUMBERS[n]} {shape}s", [{"class": shape, "count": n}]),
        )[i % 3]
        geneval.append(json.dumps({"tag": tag, "include": include, "prompt": prompt}))
    (folder / "GenEval_shapes.jsonl").write_text("\n".join(geneval) + "\n", encoding="utf-8")

    edits = [world.random_edit(rng, scene, "all", kinds=("recolor", "remove", "background")) for scene in scenes]
    gedit = {"task_type": [], "key": [], "instruction": [], "instruction_language": [], "input_image": [],
             "Intersection_exist": []}  # fmt: skip
    for i, (e, png) in enumerate(zip(edits, images)):
        gedit["task_type"].append(
            {"recolor": "color_alter", "remove": "subject-remove"}.get(e.kind, "background_change")
        )
        gedit["key"].append(f"shapes{i:03d}")
        gedit["instruction"].append(e.instruction)
        gedit["instruction_language"].append("en")
        gedit["input_image"].append({"bytes": png, "path": None})
        gedit["Intersection_exist"].append(True)
    pq.write_table(pa.table(gedit), folder / "GEdit_shapes.parquet")
    originals = folder / "imgedit_originals" / "shapes"
    originals.mkdir(parents=True, exist_ok=True)
    imgedit = {}
    for i, (e, png) in enumerate(zip(edits, images)):
        (originals / f"{i}.png").write_bytes(png)
        imgedit[str(i)] = {"id": f"shapes/{i}.png", "prompt": e.instruction, "edit_type": e.kind}
    (folder / "ImgEdit_shapes.json").write_text(json.dumps(imgedit, indent=1) + "\n", encoding="utf-8")
    wise = [
        {"prompt_id": i + 1, "Prompt": c.text, "Category": "Shapes", "Subcategory": c.form, "Explanation": c.text}
        for i, c in enumerate(rng.choice(world.captions(scene, "all")) for scene in scenes)
    ]
    (folder / "WISE_shapes.json").write_text(json.dumps(wise, indent=1) + "\n", encoding="utf-8")
    return {
        "mmbench": _write_tsv(folder / "MMBench_shapes.tsv", mmbench),
        "mme": _write_tsv(folder / "MME_shapes.tsv", mme),
        "pope": _write_tsv(folder / "POPE_shapes.tsv", pope),
        "mmmu": folder / "MMMU_shapes.parquet",
        "geneval": folder / "GenEval_shapes.jsonl",
        "gedit": folder / "GEdit_shapes.parquet",
        "imgedit": folder / "ImgEdit_shapes.json",  # originals under imgedit_originals/
        "wise": folder / "WISE_shapes.json",
    }
