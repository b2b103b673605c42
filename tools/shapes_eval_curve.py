"""ShapesEval over a run's exported checkpoints (``RUN/exports/step-N``, written
with ``export_every``): the score-versus-steps curve of the model card.

    python tools/shapes_eval_curve.py runs/shapes --items 30 [--settings openbagel/assets/shapes]

Each export is sampled with its own ``openbagel.json`` defaults, or with
those of ``--settings FOLDER`` (text-to-image, edit and text settings; for
example the shipped model's, so that every point uses the settings users get).
Writes ``RUN/eval_curve.json`` (one record per export and settings: step,
scores) and prints a Markdown table. Exports already in the JSON file are not
evaluated again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("t2i.one", "t2i.relation", "t2i", "t2i_heldout", "qa", "edit", "style", "next_frame", "think", "overall")


def curve(run: Path, items: int, seed: int, settings: Path | None = None) -> list[dict]:
    from dataclasses import replace

    from openbagel.config import config_from_checkpoint
    from openbagel.pipeline import BagelPipeline
    from openbagel.shapes.eval import ModelPredictor, evaluate, make_items

    out = run / "eval_curve.json"
    records = json.loads(out.read_text()) if out.exists() else []
    label = "export" if settings is None else str(settings)
    key = lambda r: (r["step"], r["items_per_task"], r["seed"], r.get("settings", "export"))  # noqa: E731
    done = {key(r) for r in records}
    defaults = None if settings is None else config_from_checkpoint(settings)
    item_list = make_items(items, seed)
    for folder in sorted((run / "exports").glob("step-*")):
        step = int(folder.name.split("-")[1])
        if (step, items, seed, label) in done:
            continue
        pipe = BagelPipeline.from_pretrained(folder)
        if defaults is not None:
            pipe.config = replace(pipe.config, t2i=defaults.t2i, edit=defaults.edit, text=defaults.text)
        scores = evaluate(ModelPredictor(pipe), item_list)
        records.append({"step": step, "items_per_task": items, "seed": seed, "settings": label, "scores": scores})
        records.sort(key=key)
        out.write_text(json.dumps(records, indent=1) + "\n")
        print(f"step {step}: overall {scores['overall']:.3f}", flush=True)
    return [r for r in records if key(r)[1:] == (items, seed, label)]


def table(records: list[dict]) -> str:
    lines = ["| step | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r['scores'][c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder (with exports/)")
    parser.add_argument("--items", type=int, default=30, help="items per task")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the item set")
    parser.add_argument("--settings", type=Path, help="sample with this checkpoint folder's defaults")
    args = parser.parse_args()
    print(table(curve(args.run, args.items, args.seed, args.settings)))
