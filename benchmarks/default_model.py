"""Time the embedded default model on this machine: one image at the model's
default settings (text to image), and one of each other task, against the
2-second target of issue 5 for text to image.

    python benchmarks/default_model.py [--runs 5] [--threads N]

Prints the median and the fastest of ``--runs`` timed runs per task (after one
warm-up run), and the ratio of the text-to-image median to the target.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TARGET_S = 2.0
PROMPT = "a red circle above a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per task (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from openbagel import BagelPipeline

    t0 = time.perf_counter()
    pipe = BagelPipeline.from_pretrained()
    load_s = time.perf_counter() - t0
    image = pipe.text_to_image(PROMPT, seed=0).image
    tasks = {
        "text to image": lambda i: pipe.text_to_image(PROMPT, seed=i),
        "text to image, --think": lambda i: pipe.text_to_image(PROMPT, seed=i, think=True),
        "edit": lambda i: pipe.edit(image, "make the circle green", seed=i),
        "understand": lambda i: pipe.understand(image, "what color is the circle?"),
        "next frame (3 frames in)": lambda i: pipe.predict_frames([image] * 3, 1, seed=i),
    }
    print(
        f"model load: {load_s:.2f} s; {torch.get_num_threads()} CPU threads; {pipe.config.t2i.sampling.num_timesteps} schedule points"
    )
    print(f"{'task':<26} {'median s':>9} {'fastest s':>10}")
    medians = {}
    for name, run in tasks.items():
        run(10_000)  # warm-up (another seed)
        times = []
        for i in range(args.runs):
            t = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - t)
        medians[name] = statistics.median(times)
        print(f"{name:<26} {medians[name]:>9.3f} {min(times):>10.3f}")
    ratio = medians["text to image"] / TARGET_S
    verdict = "meets" if ratio <= 1 else "misses"
    print(f"text to image: {medians['text to image']:.3f} s = {ratio:.2f} x the {TARGET_S:.0f} s target ({verdict} it)")


if __name__ == "__main__":
    main()
