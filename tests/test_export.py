"""Export to the official checkpoint layout and load it back."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from openbagel import BagelPipeline
from openbagel.checkpoint import load_model, load_vae, save_checkpoint
from openbagel.config import preset
from openbagel.golden import GoldenRunner
from openbagel.packing import SpecialIds
from openbagel.train.packing import ImageSplit, TextSplit, pack
from openbagel.train.trainer import OptimConfig, Trainer, new_model


def test_exported_golden_model_still_matches_the_reference(tmp_path, golden_dir, tiny_dir):
    out = tmp_path / "golden"
    out.mkdir()
    for f in ("cases.json", "case1_text.safetensors", "case4_edit.safetensors"):
        shutil.copy(golden_dir / f, out / f)
    cases = json.loads((golden_dir / "cases.json").read_text())
    (out / "cases.json").write_text(json.dumps({k: cases[k] for k in ("_common", "case1_text", "case4_edit")}))
    save_checkpoint(out / "tiny-random", load_model(tiny_dir), load_vae(tiny_dir), tokenizer_dir=tiny_dir)
    # the published file layout: same names and values as the golden files
    for name in ("ema.safetensors", "ae.safetensors"):
        ours, ref = load_file(out / "tiny-random" / name), load_file(tiny_dir / name)
        ref = {k: v for k, v in ref.items() if not k.endswith("pos_embed.pos_embed")}
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    vit = json.loads((out / "tiny-random" / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == 3  # declares one more than the 2 built, as published
    runner = GoldenRunner(out)
    for name in runner.names():
        result = runner.run(name)
        assert result.ok, (name, result.failures)


def test_trained_model_round_trip(tmp_path, tiny_dir):
    cfg = preset("tiny-golden")
    model, vae = new_model(cfg, seed=5), load_vae(tiny_dir)
    special = SpecialIds(257, 258, 265, 266)
    batch = pack([[TextSplit(list(b"a cube")), ImageSplit(torch.zeros(3, 32, 32), loss=True)]], cfg, special)
    Trainer(model, vae, OptimConfig(lr=1e-2)).step([batch])
    save_checkpoint(tmp_path / "run", model, vae, tokenizer_dir=tiny_dir, dtype=torch.bfloat16)
    pipe = BagelPipeline.from_pretrained(tmp_path / "run")
    assert pipe.config == cfg
    torch.testing.assert_close(pipe.model.vae2llm.weight, model.vae2llm.weight.to(torch.bfloat16).float())
    assert pipe.text_to_image("a cube", seed=0, num_timesteps=2).image.size == (64, 64)
    assert not list((tmp_path / "run").glob(".*.tmp"))
