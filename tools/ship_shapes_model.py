"""Copy a trained shapes-world checkpoint into the package as the embedded
default model (openbagel/assets/shapes), next to the world's tokenizer and
autoencoder, then load it back strictly.

    python tools/ship_shapes_model.py runs/shapes-defaults/checkpoint

The run must have used the package's assets (configs/shapes.yaml and
configs/shapes-defaults.yaml do): its
tokenizer must equal the shipped one. The per-model defaults written to
openbagel.json are those of the ``shapes`` preset (tuned after training). The weights keep their float32 storage
(about 12 MB; the whole folder stays under the 30 MB limit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from openbagel.config import OPENBAGEL_EXTRA, config_from_checkpoint, openbagel_extra, preset
from openbagel.fileio import write_atomically
from openbagel.pipeline import DEFAULT_MODEL, BagelPipeline

LIMIT_MB = 30
COPIED = ("llm_config.json", "vit_config.json")


def ship(checkpoint: Path, dest: Path = DEFAULT_MODEL) -> int:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / name).read_bytes() != (dest / name).read_bytes():
            sys.exit(f"{checkpoint / name} differs from {dest / name}: train with the package's assets")
    for name in COPIED:
        shutil.copyfile(checkpoint / name, dest / name)
    # the per-model defaults (sizes, sampling, text limits) are the preset's as
    # they are now: tuned after training, they need no retraining to change
    tuned = preset("shapes")
    config = replace(config_from_checkpoint(checkpoint), t2i=tuned.t2i, edit=tuned.edit, text=tuned.text)
    text = json.dumps(openbagel_extra(config), indent=2) + "\n"
    write_atomically(dest / OPENBAGEL_EXTRA, lambda tmp: Path(tmp).write_text(text))
    weights = {k: v.contiguous() for k, v in load_file(checkpoint / "ema.safetensors").items()}
    write_atomically(dest / "ema.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    BagelPipeline.from_pretrained(dest)  # strict load: every tensor present and shaped right
    total = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    print(f"shipped {checkpoint} to {dest}: {total / 2**20:.1f} MB in all (limit {LIMIT_MB} MB)")
    return 0 if total <= LIMIT_MB * 2**20 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="an exported checkpoint folder (runs/NAME/checkpoint)")
    sys.exit(ship(parser.parse_args().checkpoint))
