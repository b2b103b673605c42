"""The training packer and loss step against the golden training-forward case,
and a tiny model overfitting a few samples."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from openbagel.checkpoint import load_model, load_vae
from openbagel.packing import SpecialIds, unpatchify
from openbagel.train.packing import ImageSplit, TextSplit, pack
from openbagel.train.step import compute_losses

from .conftest import GOLDEN

SPECIAL = SpecialIds(257, 258, 265, 266)
CASES = ["case5_train_forward_shift1", "case5_train_forward_shift3"]


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def golden_samples(case: dict, data: dict) -> list:
    """The three samples of golden case 5, rebuilt from its texts and pixels."""
    imgs = data["in_padded_images"]  # [3, 3, 64, 80], each image top-left
    (h0, w0), (h1, w1), (h2, w2) = case["patchified_vae_latent_shapes"]
    vit = data["in_packed_vit_tokens"].split(data["in_vit_token_seqlens"].tolist())
    # ViT images: 4x5 patches of 14 px (56x70)
    vit0, vit1 = (unpatchify(v, 4, 5, 14) for v in vit)
    (t0,), (t1q, t1a), (t2,) = case["texts"]
    return [
        [TextSplit(ids(t0)), ImageSplit(imgs[0, :, : h0 * 16, : w0 * 16], "vae", loss=True)],
        [ImageSplit(vit0, "vit"), TextSplit(ids(t1q)), TextSplit(ids(t1a), loss=True)],
        [
            ImageSplit(imgs[1, :, : h1 * 16, : w1 * 16], "vae"),
            ImageSplit(vit1, "vit"),
            TextSplit(ids(t2)),
            ImageSplit(imgs[2, :, : h2 * 16, : w2 * 16], "vae", loss=True),
        ],
    ]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir), load_vae(tiny_dir)


@pytest.mark.parametrize("name", CASES)
def test_packing_matches_reference(tiny, name):
    case = json.loads((GOLDEN / "cases.json").read_text())[name]
    data = load_file(str(GOLDEN / f"{name}.safetensors"))
    model, _ = tiny
    batch = pack(golden_samples(case, data), model.config, SPECIAL)
    assert batch.length == case["sequence_length"] and batch.sample_lens == case["sample_lens"]
    for ours, ref in [
        (batch.position_ids, "in_packed_position_ids"),
        (batch.text_ids, "in_packed_text_ids"),
        (batch.text_indexes, "in_packed_text_indexes"),
        (batch.vit_indexes, "in_packed_vit_token_indexes"),
        (batch.vit_position_ids, "in_packed_vit_position_ids"),
        (batch.latent_indexes, "in_packed_vae_token_indexes"),
        (batch.latent_position_ids, "in_packed_latent_position_ids"),
        (batch.ce_indexes, "in_ce_loss_indexes"),
        (batch.ce_labels, "in_packed_label_ids"),
        (batch.mse_indexes, "in_mse_loss_indexes"),
    ]:
        assert ours.tolist() == data[ref].tolist(), ref
    torch.testing.assert_close(batch.vit_patches, data["in_packed_vit_tokens"])
    mask = batch.attention_mask()
    start = 0
    for i, n in enumerate(case["sample_lens"]):
        assert torch.equal(mask[start : start + n, start : start + n], data[f"in_nested_attention_mask_{i}"] == 0)
        start += n
    assert not mask[:31, 31:].any()  # nothing across samples


@pytest.mark.parametrize("name", CASES)
def test_losses_match_reference(tiny, name):
    case = json.loads((GOLDEN / "cases.json").read_text())[name]
    data = load_file(str(GOLDEN / f"{name}.safetensors"))
    model, vae = tiny
    batch = pack(golden_samples(case, data), model.config, SPECIAL)
    # one raw timestep draw per generated image, as stored per token
    raw = data["in_packed_timesteps"]
    counts = [h * w for h, w in batch.vae_latent_shapes]
    image_logits = torch.stack([chunk[0] for chunk in raw.split(counts)])
    with torch.no_grad():
        losses = compute_losses(
            model,
            vae,
            batch,
            timestep_shift=case["timestep_shift"],
            image_logits=image_logits,
            flow_noise=data["noise"],
            vae_noise=data["vae_eps"],
        )
    torch.testing.assert_close(losses.ce_per_token, data["ce_per_token"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses.mse_per_element, data["mse_per_element"], rtol=1e-4, atol=1e-5)
    assert losses.ce.item() == pytest.approx(case["scalars"]["ce_mean"], rel=1e-5)
    assert losses.mse.item() == pytest.approx(case["scalars"]["mse_mean"], rel=1e-5)
    assert losses.total.item() == pytest.approx(case["scalars"]["ce_mean"] + case["scalars"]["mse_mean"], rel=1e-5)


def test_batch_without_text_or_image_loss(tiny):
    model, vae = tiny
    g = torch.Generator().manual_seed(0)
    image_only = pack([[TextSplit(ids("a cat")), ImageSplit(torch.zeros(3, 32, 32), loss=True)]], model.config, SPECIAL)
    text_only = pack([[TextSplit(ids("q")), TextSplit(ids("an answer"), loss=True)]], model.config, SPECIAL)
    a = compute_losses(model, vae, image_only, generator=g)
    b = compute_losses(model, vae, text_only, generator=g)
    assert a.ce.item() == 0 and a.mse.item() > 0 and b.mse.item() == 0 and b.ce.item() > 0
    (a.total + b.total).backward()  # both still give gradients
    assert model.llm2vae.weight.grad is not None and model.language_model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_bad_image_sizes():
    from openbagel.config import preset

    cfg = preset("tiny-golden")
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pack([[ImageSplit(torch.zeros(3, 20, 32))]], cfg, SPECIAL)
    with pytest.raises(ValueError, match="patch size 14"):
        pack([[ImageSplit(torch.zeros(3, 20, 28), "vit")]], cfg, SPECIAL)
    with pytest.raises(ValueError, match="only VAE images can be generated"):
        ImageSplit(torch.zeros(3, 28, 28), "vit", loss=True)


@pytest.mark.parametrize("name", CASES[:1])
def test_mask_rule_equals_dense_mask(tiny, name):
    """The per-token rule (flex attention's form) gives the dense mask, in both token orders."""
    from openbagel.train.packing import allowed

    case = json.loads((GOLDEN / "cases.json").read_text())[name]
    data = load_file(str(GOLDEN / f"{name}.safetensors"))
    model, _ = tiny
    batch = pack(golden_samples(case, data), model.config, SPECIAL)
    meta = batch.token_metadata()
    idx = torch.arange(batch.length)
    dense = batch.attention_mask()
    assert torch.equal(allowed(meta, idx[:, None], idx[None, :]), dense)
    order, _ = batch.order()
    permuted = meta.permute(order)
    assert torch.equal(allowed(permuted, idx[:, None], idx[None, :]), dense[order][:, order])


def test_flex_attention_path_equals_dense(tiny):
    """The GPU training path (flex attention with a block mask), run forward on the CPU."""
    import warnings

    case = json.loads((GOLDEN / "cases.json").read_text())[CASES[0]]
    data = load_file(str(GOLDEN / f"{CASES[0]}.safetensors"))
    model, _ = tiny
    batch = pack(golden_samples(case, data), model.config, SPECIAL)
    latents = torch.randn(batch.latent_indexes.numel(), 64, generator=torch.Generator().manual_seed(0))
    t = torch.full((latents.shape[0],), 0.5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention warns when run eagerly
        dense, _ = batch.model_input(latents, t, flex=False)
        flex, _ = batch.model_input(latents, t, flex=True)
        assert flex.mask.kind == "flex" and dense.mask.kind == "dense"
        torch.testing.assert_close(model(flex), model(dense), rtol=1e-4, atol=1e-5)
