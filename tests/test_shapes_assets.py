"""The embedded model's tokenizer and autoencoder (openbagel/assets/shapes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import openbagel
from openbagel.config import preset
from openbagel.shapes import world

ASSETS = Path(openbagel.__file__).parent / "assets" / "shapes"
#: Floor under the shipped autoencoder's held-out PSNR (measured 34.6 dB on
#: these 48 images, 34.3-35.1 dB on 512; the target is 35 dB).
MIN_PSNR = 34.0
#: Floor under the fraction of eval items still read right after an
#: encode/decode round trip (measured 0.83; the misses are small shapes
#: whose corners soften).
MIN_READ_BACK = 0.8


def test_tokenizer_loads_and_is_compact():
    from openbagel.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(ASSETS)
    assert len(tok.hf.get_vocab()) == 512 == preset("shapes").llm.vocab_size
    assert tok.hf.convert_ids_to_tokens([tok.special.bos, tok.special.eos]) == ["<|im_start|>", "<|im_end|>"]
    texts = list(world.world_text(count=50, seed=99))
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # world words are whole tokens: a caption costs about a token per word
    caption = "a small purple triangle in the top left and a large orange circle on the right"
    assert len(tok.encode(caption)) <= len(caption.split()) + 2
    assert tok.decode(tok.encode("zebra 42!")) == "zebra 42!"  # bytes cover anything else


def test_tokenizer_is_reproducible(tmp_path):
    from openbagel.shapes.tokenizer import train_tokenizer

    train_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((ASSETS / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def vae():
    from openbagel.checkpoint import load_vae

    return load_vae(ASSETS, config=preset("shapes"))


def test_autoencoder_reconstructs_held_out_scenes(vae):
    from openbagel.shapes.autoencoder import psnr, world_images

    images = world_images(random.Random(4321), 48, split="test")
    assert psnr(vae, images) >= MIN_PSNR
    with torch.no_grad():
        z = vae.encode(images)
    assert z.shape == (48, 16, 8, 8)
    assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3  # fitted scale and shift


def test_checker_reads_scenes_through_the_autoencoder(vae):
    """The world's images after an encode/decode round trip: how much of what
    the checker (and a model) needs survives the autoencoder."""
    from openbagel.images import to_pil, to_tensor
    from openbagel.shapes.eval import GroundTruth, make_items, run_item, score_item

    items = [i for i in make_items(per_task=8) if i.task != "qa"]
    right = 0
    with torch.no_grad():
        for item in items:
            x = to_tensor(run_item(GroundTruth(), item))[None]
            right += score_item(item, to_pil(vae.decode(vae.encode(x))[0]))
    assert right / len(items) >= MIN_READ_BACK


def test_decoder_only_training_keeps_the_latent_space(vae, tmp_path):
    """Fine-tuning the decoder alone leaves the encoder, the latent scale and
    shift (what a model was trained on) exactly as they were."""
    import copy

    from openbagel.shapes.autoencoder import train_autoencoder

    before = copy.deepcopy(vae)
    tuned = train_autoencoder(
        steps=2, batch=2, lr=1e-3, init=copy.deepcopy(vae), crop=16, progress=False, decoder_only=True
    )
    assert tuned.cfg == before.cfg
    for (name, a), b in zip(tuned.ae.encoder.state_dict().items(), before.ae.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    changed = [not torch.equal(a, b) for a, b in zip(tuned.ae.decoder.parameters(), before.ae.decoder.parameters())]
    assert all(changed)
    assert all(p.requires_grad for p in tuned.parameters())
    import os

    from openbagel.shapes.autoencoder import save_autoencoder

    out = Path(tmp_path)
    umask = os.umask(0o022)
    try:
        save_autoencoder(tuned, out)
    finally:
        os.umask(umask)
    assert (out / "ae.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone writes 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ae.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match="decoder_only needs init"):
        train_autoencoder(steps=1, batch=1, progress=False, decoder_only=True)


def test_style_fraction_of_training_images():
    from openbagel.shapes.autoencoder import world_images

    with pytest.raises(ValueError, match=r"style_fraction must be in \[0, 0.8\]"):
        world_images(random.Random(0), 1, style_fraction=0.9)
    assert world_images(random.Random(0), 3, style_fraction=0.8).shape == (3, 3, 64, 64)
