"""Model internals: KV-cache parity, MoT routing, attention masks, position tables."""

from __future__ import annotations

import math

import pytest
import torch

from openbagel.checkpoint import load_model
from openbagel.kv_cache import KVCache
from openbagel.model.attention import AttnMask, attention
from openbagel.model.layers import by_expert, sincos_2d_table
from openbagel.packing import (
    SpecialIds,
    flattened_position_ids,
    latent_segment,
    patchify,
    sample_attention_mask,
    text_segment,
    unpatchify,
)

SPECIAL = SpecialIds(257, 258, 265, 266)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def _cache(model, capacity=4):
    c = model.config.llm
    return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity)


@torch.no_grad()
def test_full_forward_equals_prefill_plus_decode(model):
    ids = torch.randint(0, 256, (12,))
    full = model(text_segment(ids, 0))
    cache = _cache(model, capacity=2)  # forces growth too
    h1 = model(text_segment(ids[:7], 0), cache)
    cache.commit(7)
    steps = []
    for i in range(7, 12):
        steps.append(model(text_segment(ids[i : i + 1], i), cache))
        cache.commit(1)
    torch.testing.assert_close(torch.cat([h1, *steps]), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12 and cache.capacity >= 12


@torch.no_grad()
def test_uncommitted_query_leaves_cache_unchanged(model):
    cache = _cache(model, 64)
    model(text_segment(torch.arange(10), 0), cache)
    cache.commit(10)
    keys = cache.keys(0).clone()
    x = torch.randn(4, 64)
    seg = latent_segment(x, 0.5, torch.arange(4), 10, SPECIAL)
    a = model(seg, cache)
    assert cache.length == 10 and torch.equal(cache.keys(0), keys)
    b = model(seg, cache)  # same query again sees the same context
    torch.testing.assert_close(a, b)


def test_fork_is_independent():
    cache = KVCache(2, 1, 4, capacity=8)
    cache.reserve(3)
    cache.update(0, torch.ones(3, 1, 4), torch.ones(3, 1, 4))
    cache.update(1, torch.ones(3, 1, 4), torch.ones(3, 1, 4))
    cache.commit(3)
    child = cache.fork(length=2)
    assert child.length == 2
    child.reserve(1)
    child.update(0, torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    child.commit(1)
    assert torch.equal(cache.keys(0), torch.ones(3, 1, 4))
    assert torch.equal(child.keys(0)[2], torch.zeros(1, 4))
    with pytest.raises(ValueError):
        cache.fork(length=5)


@torch.no_grad()
def test_mot_routing_equals_per_token_loop(model):
    """A mixed sequence through by_expert == each token through its own expert."""
    layer = model.language_model.model.layers[0]
    x = torch.randn(9, 64)
    num_und = 4
    out = by_expert(x, num_und, layer.mlp, layer.mlp_moe_gen)
    loop = torch.stack([(layer.mlp if i < num_und else layer.mlp_moe_gen)(x[i : i + 1])[0] for i in range(9)])
    torch.testing.assert_close(out, loop, rtol=1e-6, atol=1e-6)
    # the experts really differ, so routing matters
    assert not torch.allclose(layer.mlp(x), layer.mlp_moe_gen(x))


@torch.no_grad()
def test_token_order_inside_an_image_segment_does_not_matter(model):
    """Inside a fully attended segment at one rotary position, token order changes nothing:
    this is why our markers-first order equals the reference's [start, latents, end]."""
    x = torch.randn(6, 64)
    pos = torch.arange(6)
    caches = []
    outs = []
    for order in (torch.arange(6), torch.arange(5, -1, -1)):
        cache = _cache(model, 32)
        model(text_segment(torch.arange(5), 0), cache)
        cache.commit(5)
        seg = latent_segment(x[order], 0.0, pos[order], 5, SPECIAL)
        h = model(seg, cache)
        cache.commit(seg.length)
        outs.append((order, h[2:]))
        caches.append(cache)
    (o1, h1), (o2, h2) = outs
    torch.testing.assert_close(h2, h1[o2], rtol=1e-5, atol=1e-5)
    after = [model(text_segment(torch.tensor([1, 2, 3]), 6), c) for c in caches]
    torch.testing.assert_close(after[0], after[1], rtol=1e-5, atol=1e-5)


def test_attention_causal_with_prefix_equals_dense():
    q = torch.randn(3, 4, 8)
    k = torch.randn(7, 2, 8)
    v = torch.randn(7, 2, 8)
    dense = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    torch.testing.assert_close(attention(q, k, v, AttnMask.causal()), attention(q, k, v, AttnMask.dense(dense)))
    # GQA == repeated kv heads, computed by hand
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kr) / math.sqrt(8)
    scores = scores.masked_fill(~dense, float("-inf"))
    manual = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vr)
    torch.testing.assert_close(attention(q, k, v, AttnMask.causal()), manual, rtol=1e-5, atol=1e-5)


def test_attention_backend_choice():
    from openbagel.model import attention as attn

    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_attention_backend("cudnn")
    if not attn.flash_attn_available():
        with pytest.raises(ImportError, match="flash-attn is not installed"):
            attn.set_attention_backend("flash")
    # CPU tensors always take SDPA, whatever the backend
    q = torch.randn(3, 4, 8)
    assert not attn._use_flash(q, AttnMask.full())
    attn.set_attention_backend("sdpa")
    attn.set_attention_backend("auto")


def test_sincos_table_layout():
    t = sincos_2d_table(4, 16)
    assert t.shape == (16, 16)
    # row r*4+c: first half encodes column c, second half row r; sin block then cos block
    r, c = 2, 3
    w = 10000 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expect = torch.cat([torch.sin(c * w), torch.cos(c * w), torch.sin(r * w), torch.cos(r * w)]).float()
    torch.testing.assert_close(t[r * 4 + c], expect)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (6, 8)
    # token 0 holds rows 0-1, cols 0-1; features ordered (row, col, channel)
    assert tokens[0].tolist() == [
        x[0, 0, 0],
        x[1, 0, 0],
        x[0, 0, 1],
        x[1, 0, 1],
        x[0, 1, 0],
        x[1, 1, 0],
        x[0, 1, 1],
        x[1, 1, 1],
    ]
    assert torch.equal(unpatchify(tokens, 2, 3, 2), x)


def test_position_ids():
    assert flattened_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]
    # interpolate: a 2x2 grid spread over a 4x4 table
    assert flattened_position_ids(2, 2, 4, "interpolate").tolist() == [0, 2, 8, 10]


def test_sample_attention_mask_matches_reference(golden_dir):
    """Rebuild the golden training masks from the samples' splits (cases.json texts and shapes)."""
    from safetensors.torch import load_file

    data = load_file(str(golden_dir / "case5_train_forward_shift1.safetensors"))
    vit = data["in_vit_token_seqlens"].tolist()
    samples = [
        # T2I: text (13 = BOS + "A red cube." + EOS), image to generate (4x4 + 2 markers)
        ([13, 18], ["causal", "noise"]),
        # VLM: ViT image, question, answer
        ([vit[0] + 2, 13, 9], ["full", "causal", "causal"]),
        # edit: clean VAE image, ViT image, instruction, image to generate
        ([22, vit[1] + 2, 15, 22], ["full", "full", "causal", "noise"]),
    ]
    for i, (lens, modes) in enumerate(samples):
        ref = data[f"in_nested_attention_mask_{i}"] == 0
        assert torch.equal(sample_attention_mask(lens, modes), ref), i


@torch.no_grad()
def test_vae_encode_mean_or_sample(tiny_dir):
    from openbagel.checkpoint import load_vae

    vae = load_vae(tiny_dir)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = vae.encode(x)
    assert mean.shape == (1, 16, 4, 6)
    torch.testing.assert_close(mean, vae.encode(x))  # deterministic by default
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)
    # the posterior sample is mean + std * eps, in BAGEL's scaled latent space
    eps = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    m, logvar = vae.moments(x).chunk(2, dim=1)
    torch.testing.assert_close(a, 0.3611 * (m + torch.exp(0.5 * logvar) * eps - 0.1159))
    # decode inverts the scaling: decode(encode) has the input's shape
    assert vae.decode(mean).shape == (1, 3, 32, 48)
