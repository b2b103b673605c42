"""The optimisation loop on a tiny model: overfitting, accumulation, freezing, schedule."""

from __future__ import annotations

import logging

import pytest
import torch

from openbagel.checkpoint import load_vae
from openbagel.config import preset
from openbagel.packing import SpecialIds
from openbagel.train.packing import CondDropout, ImageSplit, TextSplit, pack
from openbagel.train.trainer import OptimConfig, Trainer, copy_understanding_to_generation, freeze, lr_at, new_model

SPECIAL = SpecialIds(257, 258, 265, 266)
CFG = preset("tiny-golden")


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def fixed_samples(n: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        img = torch.rand(3, 32, 32, generator=g) * 2 - 1
        if i % 2 == 0:  # text to image
            samples.append([TextSplit(ids(f"picture {i}")), ImageSplit(img, "vae", loss=True)])
        else:  # understanding
            vit = torch.nn.functional.interpolate(img[None], size=(28, 28))[0]
            samples.append([ImageSplit(vit, "vit"), TextSplit(ids("what?")), TextSplit(ids(f"thing {i}"), loss=True)])
    return samples


@pytest.fixture(scope="module")
def vae(tiny_dir):
    return load_vae(tiny_dir)


def test_overfits_eight_samples(vae):
    model = new_model(CFG, seed=0)
    batch = pack(fixed_samples(), CFG, SPECIAL)
    trainer = Trainer(model, vae, OptimConfig(lr=3e-3, warmup_steps=5, max_steps=150))
    first = last = None
    for _ in range(150):
        trainer.generator.manual_seed(0)  # the same times and noise every step: pure memorisation
        stats = trainer.step([batch])
        first = first or stats
        last = stats
    assert first.num_ce_tokens == 4 * len("thing 1") + 4 and first.num_mse_tokens == 4 * 4
    assert last.loss_ce < first.loss_ce / 10, (first.loss_ce, last.loss_ce)
    assert last.loss_mse < first.loss_mse / 5, (first.loss_mse, last.loss_mse)


def test_accumulation_equals_one_merged_batch(vae):
    """Two packs accumulated == both samples in one pack: losses are normalised by the summed counts."""
    samples = [
        [TextSplit(ids("question one")), TextSplit(ids("a short answer"), loss=True)],
        [TextSplit(ids("q2")), TextSplit(ids("a much longer answer than the first"), loss=True)],
    ]
    grads = []
    for batches in ([pack(samples[:1], CFG, SPECIAL), pack(samples[1:], CFG, SPECIAL)], [pack(samples, CFG, SPECIAL)]):
        model = new_model(CFG, seed=1)
        trainer = Trainer(model, vae, OptimConfig(lr=1e-3, grad_clip=0.0))
        stats = trainer.step(batches)
        grads.append((stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (s1, g1), (s2, g2) = grads
    assert (
        s1.num_ce_tokens == s2.num_ce_tokens == len("a short answer") + len("a much longer answer than the first") + 2
    )
    assert s1.loss == pytest.approx(s2.loss, rel=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-7, msg=name)


def test_freeze_understanding_expert(vae):
    model = new_model(CFG, seed=2)
    freeze(model, ["und", "vit"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, vae, OptimConfig(lr=1e-2))
    trainer.step([pack(fixed_samples(2), CFG, SPECIAL)])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(
        "_moe_gen" in n or not n.startswith(("language_model.", "vit_model.", "connector.")) for n in changed
    )
    assert "language_model.model.layers.0.mlp_moe_gen.up_proj.weight" in changed
    assert "language_model.model.layers.0.mlp.up_proj.weight" not in changed
    with pytest.raises(ValueError, match="unknown freeze part"):
        freeze(model, ["vae2"])


def test_generation_expert_starts_as_copy():
    model = new_model(CFG, seed=3)
    layer = model.language_model.model.layers[1]
    assert torch.equal(layer.self_attn.q_proj_moe_gen.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp_moe_gen.down_proj.weight, layer.mlp.down_proj.weight)
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(1.0)
    copy_understanding_to_generation(model)
    assert torch.equal(layer.mlp_moe_gen.down_proj.weight, layer.mlp.down_proj.weight)


def test_image_content_is_not_swamped_by_the_position_table():
    """From scratch, a ViT token and a latent token carry their content at about
    the scale of the fixed sin-cos position table added to them (at N(0, 0.02)
    the shapes model's ViT tokens were 96% position), and the timestep
    embedding is not negligible either."""
    cfg = preset("shapes")
    model = new_model(cfg, seed=0)
    table = model.vit_pos_embed.pos_embed[:25].norm(dim=-1).mean()
    assert table == pytest.approx((cfg.llm.hidden_size / 2) ** 0.5, rel=1e-5)  # 8 at hidden 128
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(25, 3 * cfg.vit.patch_size**2, generator=g) * 2 - 1
    with torch.no_grad():
        vit = model.connector(model.vit_model(pixels, torch.arange(25), [25]))
        latents = model.vae2llm(torch.randn(16, cfg.latent_channels_per_token, generator=g))
        times = model.time_embedder(torch.linspace(0, 1, 16))
    for content, lowest in ((vit, 0.4), (latents, 0.8), (times, 0.1)):
        ratio = float(content.norm(dim=-1).mean() / table)
        assert lowest < ratio < 3.0, ratio


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="cosine", min_lr=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(50, OptimConfig(lr=2.0)) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")


def test_ema_tracks_and_warns(vae, caplog):
    model = new_model(CFG, seed=4)
    with caplog.at_level(logging.WARNING):
        Trainer(model, vae, OptimConfig(max_steps=100, ema_decay=0.9999))
    assert "EMA decay" in caplog.text
    trainer = Trainer(model, vae, OptimConfig(lr=1e-2, ema_decay=0.5))
    w0 = model.vae2llm.weight.detach().clone()
    trainer.step([pack(fixed_samples(2), CFG, SPECIAL)])
    w1 = model.vae2llm.weight.detach()
    torch.testing.assert_close(trainer.ema.shadow["vae2llm.weight"], 0.5 * w0 + 0.5 * w1)


def test_condition_dropout_follows_the_reference():
    text_cond = TextSplit(ids("a caption"), condition=True)
    image_cond = ImageSplit(torch.zeros(3, 32, 32), "vae", condition=True)
    target = ImageSplit(torch.zeros(3, 32, 32), "vae", loss=True)
    always = CondDropout(text=1.0, vit=1.0, vae=1.0)
    batch = pack([[image_cond, text_cond, target]], CFG, SPECIAL, dropout=always)
    # both conditions dropped: only the target remains; the dropped image still advanced the counter
    assert batch.length == 4 + 2 and batch.position_ids.tolist() == [1] * 6
    kept = pack([[image_cond, text_cond, target]], CFG, SPECIAL, dropout=CondDropout(0, 0, 0))
    assert kept.length == 6 + 11 + 6
    with pytest.raises(ValueError, match="condition dropout"):
        CondDropout(text=1.5)


def test_activation_checkpointing_gives_the_same_gradients(vae):
    from openbagel.train.trainer import apply_activation_checkpointing

    batch = pack(fixed_samples(2), CFG, SPECIAL)
    grads = []
    for checkpointing in (False, True):
        model = new_model(CFG, seed=6)
        if checkpointing:
            apply_activation_checkpointing(model)
        trainer = Trainer(model, vae, OptimConfig(grad_clip=0.0))
        trainer.generator.manual_seed(0)
        trainer.step([batch])
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        if grads[0][n] is not None:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
