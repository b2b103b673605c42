"""GenEval: images for its prompts, in the folder tree its official scorer reads.

GenEval (djghosh13/geneval) scores text-to-image prompts with an object
detector (Mask2Former) and CLIP, which openbagel does not ship. This module
writes what the scorer reads, resumably:

    OUT/<prompt index:05d>/metadata.jsonl      the prompt's JSON line, as in evaluation_metadata.jsonl
    OUT/<prompt index:05d>/samples/<k:05d>.png  image k of the prompt (4 by default, as BAGEL's run)

and :data:`SCORER_COMMANDS` are the commands that score it. BAGEL's
published run (``scripts/eval/run_geneval.sh``): 4 images per prompt at
1024 x 1024, text guidance 4.0 over the whole schedule, shift 3.0, 50 steps;
0.82 with the original prompts, 0.88 with rewritten ones
(``evaluation_metadata_long.jsonl``). Its script also crops each image to
PIL's ``getbbox`` (which cuts only pure-black borders, none in a natural
picture); openbagel saves whole images (a black-background picture stays whole).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from openbagel.errors import InvalidInputError
from openbagel.evals.folders import check_limit, open_run_folder, record_run
from openbagel.fileio import write_atomically

#: How to score the folder with GenEval's own scripts (run in a clone of djghosh13/geneval).
SCORER_COMMANDS = (
    "python evaluation/evaluate_images.py {out} --outfile {out}_results/results.jsonl --model-path DETECTOR_DIR",
    "python evaluation/summary_scores.py {out}_results/results.jsonl",
)


def read_geneval(path: Path) -> list[dict]:
    """The prompts of a GenEval metadata file (JSON lines with at least ``prompt`` and ``tag``).

    Raises:
        InvalidInputError: a missing file, a line that is not JSON, or one without ``prompt``/``tag``.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"GenEval metadata {path} not found: pass evaluation_metadata.jsonl with --data")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(
                f"{path} line {n} is not JSON ({e.msg}): is this evaluation_metadata.jsonl?"
            ) from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "tag" not in item:
            raise InvalidInputError(f"{path} line {n}: a GenEval prompt needs 'prompt' and 'tag' fields")
        items.append(item)
    if not items:
        raise InvalidInputError(f"{path} holds no prompts")
    return items


def run_geneval(
    pipe,
    data: Path,
    out: Path,
    *,
    images_per_prompt: int = 4,
    seed: int = 42,
    limit: int | None = None,
    resume: bool = False,
    think: bool = False,
    num_timesteps: int | None = None,
    progress: Callable[[int], None] | None = None,
    run_info: dict | None = None,
) -> int:
    """Generate ``images_per_prompt`` images per prompt into GenEval's tree; return the prompts done now.

    Image ``k`` of prompt ``i`` (0-based, file order) uses seed ``seed + i * images_per_prompt + k``,
    recorded in ``OUT/<i>/seeds.json``, so any image can be made again alone. A prompt's images are
    generated in one batch at the model's text-to-image defaults (BAGEL-7B-MoT's are the published run's).
    The settings go to ``OUT/run.json`` (with ``run_info``: the model's name...); ``resume`` refuses a folder
    made with other settings.

    Raises:
        InvalidInputError: a bad file or count, or an output folder holding another run (without ``resume``).
    """
    items = read_geneval(data)
    if images_per_prompt < 1:
        raise InvalidInputError(f"--images must be at least 1, got {images_per_prompt}")
    check_limit(limit)
    items = items[:limit] if limit is not None else items
    out = open_run_folder(out, resume)
    info = {"benchmark": "GenEval", "data": str(Path(data).resolve()), "images_per_prompt": images_per_prompt,
            "seed": seed, "think": think, "num_timesteps": num_timesteps, **(run_info or {})}  # fmt: skip
    record_run(out, info, resume)
    done_now = 0
    for i, item in enumerate(items):
        folder = out / f"{i:05d}"
        names = [folder / "samples" / f"{k:05d}.png" for k in range(images_per_prompt)]
        if (folder / "metadata.jsonl").is_file() and all(p.is_file() for p in names):
            if progress is not None:
                progress(1)  # done before a resume
            continue
        seeds = [seed + i * images_per_prompt + k for k in range(images_per_prompt)]
        result = pipe.text_to_image(
            item["prompt"],
            num_images_per_prompt=images_per_prompt,
            seed=seeds,
            think=think,
            num_timesteps=num_timesteps,
        )
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        for path, image in zip(names, result.images):
            write_atomically(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        write_atomically(folder / "seeds.json", lambda tmp, s=seeds: Path(tmp).write_text(json.dumps(s) + "\n"))
        # the metadata last: a prompt folder with it is complete
        line = json.dumps(item, ensure_ascii=False) + "\n"
        write_atomically(folder / "metadata.jsonl", lambda tmp, t=line: Path(tmp).write_text(t, encoding="utf-8"))
        done_now += 1
        if progress is not None:
            progress(1)
    return done_now
