"""How much a shapes-world checkpoint uses each word of a caption: the flow
loss of one-object images with the right caption, and with one attribute of
the caption changed (colour, shape, size, cell, background) or no caption.

    python tools/caption_sensitivity.py runs/shapes/checkpoint [--scenes 30] [--times 0.5,0.8,0.95]

A model that uses an attribute has a higher loss when it is wrong; the gap at
high noise (t near 1, where the caption decides the picture) is a cheap,
graded signal for comparing training recipes long before ShapesEval scores
move (MODEL_CARD.md, "What is wrong"). Same scenes, noise and times for every
checkpoint (seeded), so numbers compare across checkpoints.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import replace

import torch

ATTRIBUTES = ("right", "colour", "shape", "size", "cell", "background", "no caption")


def variants(scene, rng: random.Random) -> dict:
    """The scene's caption scene with one attribute changed, per attribute (None: no caption)."""
    from openbagel.shapes import world

    o = scene.objects[0]

    def other(values, current):
        return rng.choice([v for v in values if v != current])

    cells = [(r, c) for r in range(3) for c in range(3)]
    return {
        "right": scene,
        "colour": replace(scene, objects=(replace(o, color=other(list(world.COLORS), o.color)),)),
        "shape": replace(scene, objects=(replace(o, shape=other(world.SHAPES, o.shape)),)),
        "size": replace(scene, objects=(replace(o, size=other(world.SIZES, o.size)),)),
        "cell": replace(scene, objects=(replace(o, cell=other(cells, o.cell)),)),
        "background": replace(scene, background=other(list(world.BACKGROUNDS), scene.background)),
        "no caption": None,
    }


@torch.no_grad()
def sensitivity(checkpoint: str, scenes: int = 30, times: tuple[float, ...] = (0.5, 0.8, 0.95)) -> dict:
    """Mean flow MSE per ``(attribute, t)`` over ``scenes`` one-object scenes."""
    from openbagel.pipeline import BagelPipeline
    from openbagel.shapes import world
    from openbagel.train.data import SampleBuilder
    from openbagel.train.packing import CondDropout, pack
    from openbagel.train.step import compute_losses

    pipe = BagelPipeline.from_pretrained(checkpoint)
    cfg, builder = pipe.config, SampleBuilder(pipe.config, pipe.tokenizer)
    rng = random.Random(7)
    sums: dict[tuple[str, float], float] = {}
    for k in range(scenes):
        scene = world.random_scene(rng, "train", num_objects=1)
        image = world.render(scene)
        side = world.IMAGE_SIZE // cfg.latent_downsample
        noise = torch.randn(side * side, cfg.latent_channels_per_token, generator=torch.Generator().manual_seed(k))
        for name, v in variants(scene, rng).items():
            caption = "" if v is None else next(c.text for c in world.captions(v) if c.form == "full+background")
            batch = pack([builder.text_to_image(caption, image)], cfg, pipe.tokenizer.special, CondDropout(0, 0, 0))
            for t in times:
                losses = compute_losses(
                    pipe.model, pipe.vae, batch, image_logits=torch.tensor([math.log(t / (1 - t))]),
                    flow_noise=noise, vae_noise=torch.zeros(1, cfg.vae.z_channels, side * cfg.latent_patch_size, side * cfg.latent_patch_size),
                )  # fmt: skip
                sums[(name, t)] = sums.get((name, t), 0.0) + float(losses.mse)
    return {key: total / scenes for key, total in sums.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder of a shapes-world model")
    parser.add_argument("--scenes", type=int, default=30, help="one-object scenes (default 30)")
    parser.add_argument("--times", default="0.5,0.8,0.95", help="flow times, comma separated (1 = pure noise)")
    args = parser.parse_args()
    ts = tuple(float(x) for x in args.times.split(","))
    result = sensitivity(args.checkpoint, args.scenes, ts)
    print("| t | " + " | ".join(ATTRIBUTES) + " |")
    print("|---" * (len(ATTRIBUTES) + 1) + "|")
    for t in ts:
        print(f"| {t} | " + " | ".join(f"{result[(a, t)]:.3f}" for a in ATTRIBUTES) + " |")
