"""Image benchmarks judged by a model: GEdit-Bench, ImgEdit and WISE outputs in their scorers' layouts.

Their scores come from a judge model (GPT-4.1/GPT-4o in the papers, or an
open one the user serves), so openbagel writes the images where each
scorer looks, resumably, and the README gives the scorer commands:

- **GEdit-Bench** (stepfun-ai/Step1X-Edit ``GEdit-Bench/``): its parquet rows
  (``task_type``, ``key``, ``instruction``, ``instruction_language``,
  ``input_image``) -> ``OUT/fullset/<task_type>/<language>/<key>.png`` and the
  source beside it as ``<key>_SRCIMG.png`` (the scorer skips items without it).
- **ImgEdit** (PKU-YuanGroup/ImgEdit ``Benchmark/Basic``): ``basic_edit.json``
  (key -> ``id`` path under the originals' folder, ``prompt``, ``edit_type``)
  -> ``OUT/<key>.png``.
- **WISE** (PKU-YuanGroup/WISE): its JSON lists of ``Prompt`` and
  ``prompt_id`` -> ``OUT/<prompt_id>.png``; BAGEL's 0.70 is with ``--think``.

Edits run at the model's edit defaults, text to image at its text-to-image
defaults (BAGEL-7B-MoT's are the published runs'); job ``i`` uses seed
``seed + i``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openbagel.errors import InvalidInputError
from openbagel.evals.folders import check_limit, open_run_folder, record_run, safe_name
from openbagel.evals.formats import decode_image, read_rows
from openbagel.fileio import write_atomically


@dataclass(frozen=True)
class ImageJob:
    """One image to make: where it goes (relative to OUT), its prompt, and the input image of an edit."""

    path: str
    prompt: str
    source: object | None = None  # an image cell (bytes, base64, parquet struct) or a file path
    keep_source_as: str | None = None  # also save the source here (GEdit's <key>_SRCIMG.png)


def gedit_jobs(rows: list[dict[str, object]], language: str | None = "en") -> list[ImageJob]:
    """GEdit-Bench rows (only ``language``'s, all if ``None``) -> edit jobs in the scorer's tree."""
    need = ("task_type", "key", "instruction", "instruction_language", "input_image")
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise InvalidInputError(f"not in the GEdit-Bench format: no column {', '.join(missing)}")
    jobs = []
    for r in rows:
        lang = safe_name(r["instruction_language"], "GEdit-Bench instruction_language")
        if language is not None and lang != language:
            continue
        task, key = safe_name(r["task_type"], "GEdit-Bench task_type"), safe_name(r["key"], "GEdit-Bench key")
        base = f"fullset/{task}/{lang}/{key}"
        jobs.append(ImageJob(f"{base}.png", str(r["instruction"]), r["input_image"], f"{base}_SRCIMG.png"))
    if not jobs:
        found = sorted({str(r["instruction_language"]) for r in rows})
        raise InvalidInputError(f"no GEdit-Bench rows in language {language!r}; the file has {', '.join(found)}")
    return jobs


def imgedit_jobs(path: Path, images: Path) -> list[ImageJob]:
    """ImgEdit's ``basic_edit.json`` (key -> ``{"id", "prompt", "edit_type"}``), originals under ``images``."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"cannot read ImgEdit's {path}: {e}") from None
    if not isinstance(table, dict) or not all(
        isinstance(v, dict) and {"id", "prompt"} <= set(v) for v in table.values()
    ):
        raise InvalidInputError(f"{path}: expected ImgEdit's basic_edit.json (key -> id, prompt, edit_type)")
    jobs = []
    root = Path(images).resolve()
    if not root.is_dir():
        raise InvalidInputError(f"--images {images} is not a folder: give the folder of ImgEdit's originals")
    for key, item in table.items():
        source = (root / str(item["id"])).resolve()
        if not source.is_relative_to(root):
            raise InvalidInputError(f"ImgEdit id {item['id']!r} points outside --images; fix that entry")
        if not source.is_file():
            raise InvalidInputError(f"ImgEdit original {source} not found: pass the originals' folder with --images")
        jobs.append(ImageJob(f"{safe_name(key, 'ImgEdit key')}.png", str(item["prompt"]), source))
    return jobs


def wise_jobs(paths: list[Path]) -> list[ImageJob]:
    """WISE's JSON lists (``Prompt``, ``prompt_id``; one file per category) -> text-to-image jobs."""
    jobs = []
    for path in paths:
        for row in read_rows(path):
            if "Prompt" not in row or "prompt_id" not in row:
                raise InvalidInputError(f"{path}: a WISE row needs Prompt and prompt_id")
            jobs.append(ImageJob(f"{safe_name(row['prompt_id'], 'WISE prompt_id')}.png", str(row["Prompt"])))
    ids = [j.path for j in jobs]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("WISE prompt_id values repeat across the given files")
    return jobs


def _load_source(source: object):
    from openbagel.images import load_image

    return load_image(source) if isinstance(source, Path) else decode_image(source)


def run_image_jobs(
    pipe,
    jobs: list[ImageJob],
    out: Path,
    *,
    seed: int = 42,
    limit: int | None = None,
    resume: bool = False,
    think: bool = False,
    num_timesteps: int | None = None,
    progress: Callable[[int], None] | None = None,
    run_info: dict | None = None,
) -> int:
    """Make each job's image under ``out`` (skipping those already there with ``resume``); return how many now.

    The settings go to ``OUT/run.json`` (with ``run_info``: the benchmark, data, model...); ``resume``
    refuses a folder made with other settings.

    Raises:
        InvalidInputError: a bad ``limit``, or an output folder holding another run (without ``resume``).
    """
    check_limit(limit)
    jobs = jobs[:limit] if limit is not None else jobs
    out = open_run_folder(out, resume)
    record_run(out, {"seed": seed, "think": think, "num_timesteps": num_timesteps, **(run_info or {})}, resume)
    made = 0
    for i, job in enumerate(jobs):
        target = out / job.path
        if target.is_file():
            if progress is not None:
                progress(1)  # done before a resume
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if job.source is None:
            image = pipe.text_to_image(job.prompt, seed=seed + i, think=think, num_timesteps=num_timesteps).image
        else:
            source = _load_source(job.source)
            if job.keep_source_as is not None:
                write_atomically(out / job.keep_source_as, lambda tmp, im=source: im.save(tmp, format="PNG"))
            image = pipe.edit(source, job.prompt, seed=seed + i, think=think, num_timesteps=num_timesteps).image
        write_atomically(target, lambda tmp, im=image: im.save(tmp, format="PNG"))  # last: the job is done
        made += 1
        if progress is not None:
            progress(1)
    return made
