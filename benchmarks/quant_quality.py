"""How close each quantized mode stays to bfloat16 (the table in README "Memory").

    python benchmarks/quant_quality.py            # about a minute on 2 CPU cores

For the golden tiny config (random weights) and the embedded model: the
relative error of the final latents of 4 ShapesEval text-to-image prompts
(same noise) and the greedy-token agreement over the replies to 4 ShapesEval
questions (teacher-forced, see openbagel.fidelity), each mode against the
bfloat16 model; for the embedded model also the ShapesEval score of a
4-items-per-task subset (10 schedule points).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from openbagel import BagelPipeline
from openbagel.fidelity import latent_error, token_agreement
from openbagel.shapes.eval import ModelPredictor, evaluate, make_items

TINY = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tiny-random"
MODES = ("llm=int8", "llm=fp8", "llm=nf4", "llm=int8,vit=int8,head=int8")


def main() -> None:
    torch.set_num_threads(1)
    items = make_items(4, 2024)
    qa = [i for i in items if i.task == "qa"]
    prompts = [i.prompt for i in items if i.task == "t2i"][:4]
    questions = [i.prompt for i in qa]
    for folder, name, image, steps in (
        (TINY, "tiny", Image.new("RGB", (64, 64), (200, 30, 30)), 5),
        (None, "embedded", qa[0].images[0], 10),
    ):
        ref = BagelPipeline.from_pretrained(folder, dtype="bfloat16")
        if name == "embedded":
            print(
                f"{name} bf16: ShapesEval subset {evaluate(ModelPredictor(ref, num_timesteps=steps), items)['overall']:.3f}"
            )
        for mode in MODES:
            t = time.perf_counter()
            pipe = BagelPipeline.from_pretrained(folder, dtype="bfloat16", quant=mode)
            err = latent_error(ref, pipe, prompts, num_timesteps=steps)
            agree = token_agreement(ref, pipe, image, questions)
            line = f"{name} {mode}: latent error {err:.2%}, token agreement {agree:.1%}"
            if name == "embedded":
                line += (
                    f", ShapesEval subset {evaluate(ModelPredictor(pipe, num_timesteps=steps), items)['overall']:.3f}"
                )
            print(f"{line} ({time.perf_counter() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
