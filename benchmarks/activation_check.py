"""The planner's activation estimate against a measured peak: one batched
denoising query (text to image, two guidance branches) on ``small`` with
random weights.

    python benchmarks/activation_check.py [SIDE ...]        # default 256 512 1024

Measured: on CUDA, max allocated minus allocated before the forward; on a
CPU, the peak of torch's memory timeline (profiler, float32). The planner
(``openbagel.plan.activation_bytes``) assumes attention kernels that do not
materialise the scores; the CPU kernels do at large sizes, so on a CPU the
measured peak exceeds the estimate there (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings

import torch

from openbagel.bench import build_random, special_ids
from openbagel.config import preset
from openbagel.inference.denoise import BatchedQuery
from openbagel.inference.session import FULL, TEXT_FREE, Session
from openbagel.packing import flattened_position_ids
from openbagel.plan import activation_bytes


def measure(side: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(tokens, measured bytes, planned bytes) of one query at ``side`` x ``side``."""
    cfg = preset("small")
    model, _ = build_random(cfg, dtype, device)
    special = special_ids(cfg.llm.vocab_size)
    n = side // cfg.latent_downsample
    with torch.inference_mode():
        session = Session(model, special, capacity=2 * n * n + 512)
        session.add_text(list(range(10, 74)))
        pos = flattened_position_ids(n, n, cfg.max_latent_size, cfg.position_mode)
        query = BatchedQuery(model, [session.branch(FULL), session.branch(TEXT_FREE)], pos, special)
        x = torch.randn(2, n * n, cfg.latent_channels_per_token, device=device)
        t = torch.tensor(0.5, device=device)
        query.velocities(x, t)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            query.velocities(x, t)
            torch.cuda.synchronize(device)
            measured = torch.cuda.max_memory_allocated(device) - start
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as p:
                query.velocities(x, t)
            with tempfile.NamedTemporaryFile(suffix=".json") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p.export_memory_timeline(f.name, device="cpu")
                totals = [sum(col) for col in json.load(open(f.name))[1]]
            measured = max(totals) - totals[0]
    tokens = 2 * (n * n + 2)
    return tokens, measured, activation_bytes(cfg, dtype, tokens)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for side in [int(a) for a in sys.argv[1:]] or [256, 512, 1024]:
        tokens, measured, planned = measure(side, device, dtype)
        print(
            f"{side}x{side} ({tokens} tokens, {device}, {str(dtype).removeprefix('torch.')}): measured "
            f"{measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB ({planned / measured - 1:+.0%})"
        )


if __name__ == "__main__":
    main()
