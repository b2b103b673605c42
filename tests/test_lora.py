"""LoRA: only adapters train; merged weights equal base + adapter."""

from __future__ import annotations

import os

import torch

from openbagel.checkpoint import load_vae
from openbagel.config import preset
from openbagel.packing import SpecialIds, text_segment
from openbagel.train.lora import add_lora, load_adapter, save_adapter, unwrap
from openbagel.train.packing import ImageSplit, TextSplit, pack
from openbagel.train.trainer import OptimConfig, Trainer, new_model

SPECIAL = SpecialIds(257, 258, 265, 266)
CFG = preset("tiny-golden")


def test_only_adapters_train_and_merge_is_exact(tmp_path, tiny_dir):
    base = new_model(CFG, seed=7)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = add_lora(base, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "_moe_gen" in n for n in trainable)
    batch = pack([[TextSplit(list(b"a cube")), ImageSplit(torch.rand(3, 32, 32) * 2 - 1, loss=True)]], CFG, SPECIAL)
    trainer = Trainer(model, load_vae(tiny_dir, config=CFG), OptimConfig(lr=1e-2))
    for _ in range(3):
        trainer.step([batch])
    inner = unwrap(model)
    base_now = {n.replace(".base_layer", ""): p for n, p in inner.named_parameters() if "lora_" not in n}
    assert base_now.keys() == before.keys()
    assert all(torch.equal(base_now[n], before[n]) for n in before)  # base weights untouched
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters moved (B starts at zero)

    # merged == base + adapter, on a query through the generation expert
    from openbagel.packing import latent_segment

    seg = latent_segment(torch.randn(4, 64), 0.5, torch.arange(4), 0, SPECIAL)
    with torch.no_grad():
        with_adapter = model(seg)
    save_adapter(model, tmp_path / "adapter")
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "adapter").iterdir()}
    assert modes["adapter_model.safetensors"] == 0o666 & ~umask, modes  # safetensors writes 0o600
    fresh = new_model(CFG, seed=7)
    with torch.no_grad():
        plain = fresh(seg)
        merged = load_adapter(fresh, tmp_path / "adapter")
        assert type(merged).__name__ == "Bagel"
        torch.testing.assert_close(merged(seg), with_adapter, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, with_adapter)
    # the understanding expert is untouched: text-only queries are unchanged
    with torch.no_grad():
        torch.testing.assert_close(
            merged(text_segment(torch.arange(6), 0)), new_model(CFG, seed=7)(text_segment(torch.arange(6), 0))
        )


def test_lora_step_on_a_pack_without_generation_tokens(tiny_dir):
    """Adapters only on the generation expert and a pack with nothing to generate:
    a normal step (the loss still reaches the adapters, with zero gradient), not
    "element 0 of tensors does not require grad"."""
    model = add_lora(new_model(CFG, seed=8), r=4, alpha=8)
    batch = pack([[TextSplit(list(b"what is it?")), TextSplit(list(b"a cube"), loss=True)]], CFG, SPECIAL)
    trainer = Trainer(model, load_vae(tiny_dir, config=CFG), OptimConfig(lr=1e-2))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = trainer.step([batch])
    assert stats.loss_ce > 0 and stats.num_mse_tokens == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)
