"""The exact speed-ups give the plain path's numbers; the KV cache is not copied;
the budget refuses; step caching and the benchmark command behave."""

from __future__ import annotations

import json

import pytest
import torch

from openbagel.errors import InvalidInputError
from openbagel.inference.generate import decode_tokens, generate_latents, generate_latents_batch
from openbagel.inference.sampling import ImageSampling, TextSampling
from openbagel.inference.session import Session
from openbagel.inference.step_cache import StepCacheSettings, TaylorStepCache
from openbagel.kv_cache import CacheBudgetError, KVCache, parse_bytes
from openbagel.model.attention import AttnMask, attention
from tests.close import assert_clear_argmax, assert_images_close

T2I = ImageSampling(num_timesteps=5, guidance_scale=4.0, image_guidance_scale=1.5, cfg_interval=(0.4, 1.0))
EDIT = ImageSampling(
    num_timesteps=5,
    guidance_scale=4.0,
    image_guidance_scale=2.0,
    cfg_interval=(0.0, 1.0),
    cfg_renorm_type="text_channel",
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))


def _t2i_session(pipe, text=(10, 20, 30), system=None) -> Session:
    s = Session(pipe.model, pipe.tokenizer.special)
    if system:
        s.add_text(list(system), user=False)
    s.add_text(list(text))
    return s


def _edit_session(pipe) -> Session:
    s = Session(pipe.model, pipe.tokenizer.special)
    g = torch.Generator().manual_seed(1)
    s.add_vae_image(torch.randn(16, 64, generator=g), torch.arange(16))
    s.add_vit_image(torch.randn(16, 3 * 14 * 14, generator=g), torch.arange(16))
    s.add_text([40, 41, 42, 43])
    _ = s.image_free  # built now, not by the first generation (one more pass), so the tests count generation alone
    return s


class _Counter:
    """Counts the decoder forwards (one per model pass)."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        lm = model.language_model.model
        orig = lm.forward

        def counted(*a, **k):
            self.n += 1
            return orig(*a, **k)

        monkeypatch.setattr(lm, "forward", counted)


@pytest.mark.parametrize("kind", ["t2i", "edit", "think"])
def test_batched_guidance_equals_plain_path(pipe, monkeypatch, kind):
    """One forward per step for every branch; the plain path runs each branch
    (the redundant image-free one of text to image included) as its own pass. Same latents."""
    make = {
        "t2i": lambda: _t2i_session(pipe),
        "edit": lambda: _edit_session(pipe),
        # a system prompt before the user text and reasoning in the full context only:
        # the text-free context is a strict prefix (a masked span), the image-free one its own storage
        "think": lambda: _think_session(pipe),
    }[kind]
    params = EDIT if kind == "edit" else T2I  # 4 steps, guidance active on all of them
    fast_session, plain_session = make(), make()
    counter = _Counter(pipe.model, monkeypatch)
    fast = generate_latents(pipe.model, fast_session, 64, 64, params, noise=_noise(0))
    assert counter.n == 4
    counter.n = 0
    plain = generate_latents(pipe.model, plain_session, 64, 64, params, noise=_noise(0), plain=True)
    assert counter.n == 4 * 3
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def _think_session(pipe) -> Session:
    s = _t2i_session(pipe, system=(5, 6, 7))
    s.add_text([50, 51, 52], user=False, image_free=False)  # reasoning: full context only
    return s


def test_plain_path_runs_the_redundant_pass(pipe, monkeypatch):
    """Text to image, guidance active on every step: 3 passes per step plain, 1 fast."""
    params = ImageSampling(num_timesteps=4, guidance_scale=4.0, image_guidance_scale=1.5, cfg_interval=(0.0, 1.0))
    s = _t2i_session(pipe)
    counter = _Counter(pipe.model, monkeypatch)
    generate_latents(pipe.model, s, 64, 64, params, noise=_noise(0))
    assert counter.n == 3
    counter.n = 0
    generate_latents(pipe.model, s, 64, 64, params, noise=_noise(0), plain=True)
    assert counter.n == 9


def test_no_context_is_copied(pipe, monkeypatch):
    """Generation and decoding read the contexts in place: no KVCache.fork."""

    def no_fork(*a, **k):
        raise AssertionError("a context was copied")

    s = _edit_session(pipe)
    before = (s.full.cache.length, s.full.cache.keys(0).clone())
    monkeypatch.setattr(KVCache, "fork", no_fork)
    generate_latents(pipe.model, s, 64, 64, EDIT, noise=_noise(0))
    list(decode_tokens(pipe.model, s.decoding_context(5), s.special, TextSampling(max_new_tokens=5)))
    pipe.text_to_image("a cube", num_timesteps=3, seed=0)
    pipe.understand(pipe.text_to_image("a cube", num_timesteps=2, seed=0).image, "what?", max_new_tokens=3)
    # the conversation is unchanged by what ran on it
    assert s.full.cache.length == before[0]
    torch.testing.assert_close(s.full.cache.keys(0), before[1], rtol=0, atol=0)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="copied"):
        monkeypatch.setattr(KVCache, "fork", no_fork)
        generate_latents(pipe.model, s, 64, 64, EDIT, noise=_noise(0), plain=True)


def test_experts_see_contiguous_slices(pipe, monkeypatch):
    """In a batched denoising forward each expert's MLP runs once per layer:
    the 2 markers of each branch through the understanding expert, all latent blocks through the generation one."""
    session = _edit_session(pipe)
    rows = {"und": [], "gen": []}
    for layer in pipe.model.language_model.model.layers:
        for name, key in (("mlp", "und"), ("mlp_moe_gen", "gen")):
            mod = getattr(layer, name)
            orig = mod.forward
            monkeypatch.setattr(mod, "forward", lambda x, orig=orig, key=key: rows[key].append(x.shape[0]) or orig(x))
    generate_latents(pipe.model, session, 64, 64, replace_steps(EDIT, 2), noise=_noise(0))
    layers = len(pipe.model.language_model.model.layers)
    assert rows == {"und": [3 * 2] * layers, "gen": [3 * 16] * layers}


def replace_steps(params: ImageSampling, n: int) -> ImageSampling:
    from dataclasses import replace

    return replace(params, num_timesteps=n)


def test_batch_equals_single_runs(pipe):
    """Two prompts x two seeds in one batch, each with its own (global) renorm, equal four single runs."""
    sessions = [_t2i_session(pipe, (10, 20)), _t2i_session(pipe, (30, 40, 50))]
    params = ImageSampling(num_timesteps=4, guidance_scale=6.0, image_guidance_scale=1.5, cfg_renorm_type="global")
    batch = generate_latents_batch(
        pipe.model, [sessions[0], sessions[0], sessions[1], sessions[1]], 64, 64, params, [_noise(k) for k in range(4)]
    )
    for k in range(4):
        single = generate_latents(pipe.model, sessions[k // 2], 64, 64, params, noise=_noise(k))
        torch.testing.assert_close(batch[k], single, rtol=1e-5, atol=1e-5)
    plain = generate_latents_batch(pipe.model, sessions, 64, 64, params, [_noise(0), _noise(2)], plain=True)
    torch.testing.assert_close(plain[1], batch[2], rtol=1e-5, atol=1e-5)


def test_pipeline_batches_prompts_and_seeds(pipe):
    batch = pipe.text_to_image(["a red cube", "a blue ball"], num_images_per_prompt=2, seed=5, num_timesteps=3)
    assert len(batch.images) == 4
    singles = [
        pipe.text_to_image(p, seed=5 + k, num_timesteps=3)
        for k, p in enumerate(["a red cube"] * 2 + ["a blue ball"] * 2)
    ]
    for b, s in zip(batch.images, singles):
        assert_images_close(b, s.image, "batch vs single run")  # other shapes: equal up to float rounding
    listed = pipe.text_to_image("a red cube", num_images_per_prompt=2, seed=[6, 5], num_timesteps=3)
    assert_images_close(listed.images[1], singles[0].image, "listed seeds vs single run")
    with pytest.raises(InvalidInputError, match="2 seeds given for 3 images"):
        pipe.text_to_image("x", num_images_per_prompt=3, seed=[1, 2])
    with pytest.raises(InvalidInputError, match="num_images_per_prompt must be a whole number from 1 to 64"):
        pipe.text_to_image("x", num_images_per_prompt=0)
    with pytest.raises(InvalidInputError, match="prompt must be a string or a non-empty list"):
        pipe.text_to_image([])


def test_fast_decoding_equals_plain(pipe):
    s = _edit_session(pipe)
    params = TextSampling(max_new_tokens=12)
    fast_logits, plain_logits = [], []
    no_eos = type(s.special)(s.special.bos, -1, s.special.start_of_image, s.special.end_of_image)
    fast = list(decode_tokens(pipe.model, s.decoding_context(12), no_eos, params, on_logits=fast_logits.append))
    plain = list(decode_tokens(pipe.model, s.full.fork(), no_eos, params, on_logits=plain_logits.append, plain=True))
    torch.testing.assert_close(torch.stack(fast_logits), torch.stack(plain_logits), rtol=1e-5, atol=1e-5)
    assert_clear_argmax(plain_logits)  # so the two paths' greedy tokens cannot differ by rounding
    assert fast == plain and len(fast) == 12


def test_decoding_builds_nothing_per_token(pipe, monkeypatch):
    """Room is reserved once and no segment, mask or copy is built per decoded token."""
    import openbagel.inference.generate as gen

    s = _t2i_session(pipe)
    ctx = s.decoding_context(40)
    storage = ctx.cache.k
    monkeypatch.setattr(gen, "text_segment", lambda *a, **k: pytest.fail("a segment was built"))
    monkeypatch.setattr(torch.Tensor, "tril", lambda *a, **k: pytest.fail("a causal mask was built"))
    no_eos = type(s.special)(s.special.bos, -1, s.special.start_of_image, s.special.end_of_image)
    assert len(list(decode_tokens(pipe.model, ctx, no_eos, TextSampling(max_new_tokens=40)))) == 40
    assert ctx.cache.k is storage and s.full.cache.k is storage  # decoded in place, never regrown


def test_decoding_context_refuses_a_changed_conversation(pipe):
    s = _t2i_session(pipe)
    ctx = s.decoding_context(8)
    tokens = decode_tokens(pipe.model, ctx, s.special, TextSampling(max_new_tokens=8))
    next(tokens)
    s.add_text([1, 2])  # the conversation grows under the reply
    with pytest.raises(RuntimeError, match="conversation changed while a reply was being decoded"):
        list(tokens)


def test_single_query_causal_needs_no_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=g) for n, h in ((1, 4), (9, 2), (9, 2)))
    torch.testing.assert_close(attention(q, k, v, AttnMask.causal()), attention(q, k, v, AttnMask.full()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_gqa_attention_equals_repeated_heads(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 6, 16, generator=g).to(dtype)
    k, v = (torch.randn(11, 2, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(7, 11, generator=g) > 0.3
    mask[:, 0] = True
    for m in (AttnMask.full(), AttnMask.dense(mask)):
        ours = attention(q, k, v, m).float()
        kk, vv = k.float().repeat_interleave(3, dim=1), v.float().repeat_interleave(3, dim=1)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=m.mask
        ).transpose(0, 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


# --- the KV-cache budget ------------------------------------------------------------------


def test_budget_refuses_and_keeps_the_conversation(pipe):
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x float32 bytes
    s = Session(pipe.model, pipe.tokenizer.special, max_cache_bytes=40 * per_token)
    assert s.full.cache.bytes_per_token == per_token
    assert s.cache_bytes == 0  # nothing preallocated under a budget
    s.add_text(list(range(10, 30)))  # 22 tokens with BOS/EOS: grows to 64 rounded, cut to the 40 that fit
    assert s.cached_tokens == 22 and s.cache_bytes == 40 * per_token
    with pytest.raises(CacheBudgetError) as e:
        s.add_text(list(range(10, 28)))
    assert str(e.value).startswith(
        "this context would hold 42 tokens of KV cache (21.0 KiB), bringing the conversation to 21.0 KiB, "
        "over the KV-cache budget of 20.0 KiB; raise the budget (--kv-cache-budget)"
    )
    assert s.cached_tokens == 22  # refused before anything was added
    s.add_text(list(range(10, 20)))  # 34 tokens fit
    assert s.cached_tokens == 34 and s.cache_bytes == 40 * per_token


def test_budget_is_spent_on_what_is_needed(pipe):
    """A budgeted conversation preallocates little and grows by small steps:
    an image chat of 63 tokens (VAE and ViT image, question, 4-token reply)
    takes one 64-token step (32 KiB) within 40 KiB, where an unbudgeted one
    preallocates 256 tokens. The question is not copied into the image-free
    guidance context, which understanding never reads (that copy took a second step)."""
    from openbagel import BagelPipeline

    per_token = 512
    small = BagelPipeline(pipe.model, pipe.vae, pipe.tokenizer, pipe.config, max_cache_bytes=40 * 1024)
    unlimited = pipe.chat()
    chat = small.chat()
    image = pipe.text_to_image("a cube", num_timesteps=2, seed=0).image
    for c in (unlimited, chat):
        c.add_image(image)
        c.add_text("what is it?")
    assert chat.reply(TextSampling(max_new_tokens=4)) == unlimited.reply(TextSampling(max_new_tokens=4))
    assert chat.session.cache_bytes == 64 * per_token and unlimited.session.cache_bytes == 256 * per_token


def test_understanding_after_an_image_builds_no_guidance_context():
    """The issue's case on the embedded model: a 650-token question after an
    image under a 2,000,000-byte budget was refused (2.6 MiB asked for, the
    question's keys and values twice); it needs only the full context (1.4 MiB)."""
    from PIL import Image

    from openbagel import BagelPipeline

    pipe = BagelPipeline.from_pretrained(max_cache_bytes=2_000_000)
    question = "what is " * 162
    assert len(pipe.tokenizer.encode(question)) + 2 == 651  # with [BOS] and [EOS]
    image = Image.new("RGB", (64, 64), "red")
    assert pipe.understand(image, question, max_new_tokens=8).text is not None
    chat = pipe.chat()
    chat.add_image(image, vae=False)
    chat.add_text(question)
    s = chat.session
    assert s.cached_tokens == s.full.cache.length == 27 + 651  # ViT image (5x5 + 2 markers) and the question
    assert s.cache_bytes == s.full.cache.nbytes <= 1.4 * 2**20  # the full context's storage, nothing else


def test_budget_through_the_pipeline(pipe):
    from openbagel import BagelPipeline

    small = BagelPipeline(pipe.model, pipe.vae, pipe.tokenizer, pipe.config, max_cache_bytes=16 * 512)
    assert small.understand(None, "hi", max_new_tokens=2).text is not None  # a short text fits
    image = pipe.text_to_image("a cube", num_timesteps=2, seed=0).image
    with pytest.raises(
        CacheBudgetError,
        match=r"would hold 27 tokens of KV cache \(13.5 KiB\), bringing the conversation to 13.5 KiB, over the KV-cache budget of 8.0 KiB",
    ):
        small.understand(image, "what is it?")  # the image's ViT tokens and its 2 markers
    with pytest.raises(InvalidInputError, match="budget must be a positive number of bytes"):
        BagelPipeline(pipe.model, pipe.vae, pipe.tokenizer, pipe.config, max_cache_bytes=-1)


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("1000") == 1000
    for bad in ("", "-1GB", "2 parsecs", "0"):
        with pytest.raises(InvalidInputError, match="must be a size such as 2GB"):
            parse_bytes(bad)


# --- step caching ------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_prediction_is_exact_for_polynomials_of_its_order(order):
    cache = TaylorStepCache(StepCacheSettings(interval=3, order=order, warmup=0))
    coeffs = torch.tensor([0.5, -2.0, 3.0])[: order + 1]

    def f(t):
        return torch.full((2, 3), float(sum(c * t**i for i, c in enumerate(coeffs))))

    for t in (1.0, 0.8, 0.55)[: order + 1]:
        cache.record("b", t, f(t))
    torch.testing.assert_close(cache.predict("b", 0.3), f(0.3))


def test_step_cache_schedule_and_new_branches():
    cache = TaylorStepCache(StepCacheSettings(interval=2, order=1, warmup=2))
    assert [cache.settings.computes(i) for i in range(7)] == [True, True, True, False, True, False, True]
    for t in (1.0, 0.9):
        cache.record("full", t, torch.zeros(1))
    # step 3 is skipped, but a branch with no history (guidance just switched on) must run
    assert cache.to_compute(3, ["full", "text_free"]) == ["text_free"]


def test_step_cache_keeps_guidance_per_branch(pipe):
    settings = StepCacheSettings(interval=2, order=1, warmup=1)
    steps = []
    s = _t2i_session(pipe)
    params = ImageSampling(num_timesteps=8, guidance_scale=4.0, cfg_interval=(0.0, 1.0))
    exact = generate_latents(pipe.model, s, 64, 64, params, noise=_noise(0))
    cached = generate_latents(pipe.model, s, 64, 64, params, noise=_noise(0), on_step=steps.append, step_cache=settings)
    # predicted steps still combine a text-free velocity of their own
    assert all(st.v_text_free is not None and not torch.equal(st.v_text_free, st.v_cond) for st in steps)
    err = float((cached - exact).norm() / exact.norm())
    assert 0 < err < 0.1
    same = generate_latents(pipe.model, s, 64, 64, params, noise=_noise(0), step_cache=StepCacheSettings(interval=1))
    torch.testing.assert_close(same, exact, rtol=1e-6, atol=1e-6)


def test_step_cache_settings_checked():
    with pytest.raises(InvalidInputError, match="step cache interval must be an integer in \\[1, 100\\]"):
        StepCacheSettings(interval=0)
    with pytest.raises(InvalidInputError, match="step cache order"):
        StepCacheSettings(order=3)


# --- the benchmark command -------------------------------------------------------------------


def test_bench_command_writes_records(tmp_path):
    from typer.testing import CliRunner

    from openbagel.cli import app

    out = tmp_path / "b.json"
    args = ["bench", "--config", "tiny", "--task", "t2i", "--task", "understand", "--size", "64", "--steps", "3"]
    args += ["--runs", "1", "--decode-tokens", "3", "--long-context", "64", "--json", str(out), "--cache"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    phases = {(r["task"], r["phase"]) for r in records}
    assert phases == {
        ("t2i", "prefill"),
        ("t2i", "denoise_step"),
        ("t2i", "vae_decode"),
        ("t2i", "denoise_step_cached"),
        ("understand", "prefill"),
        ("understand", "decode"),
        ("understand", "decode_long"),
    }
    for r in records:
        assert r["config"] == "tiny" and r["median_s"] > 0 and r["speedup"] > 0 and r["peak_mem_mb"] > 100
        assert r["extra"]["mem_increase_mb"] >= 0
    step = next(r for r in records if r["phase"] == "denoise_step")
    assert step["plain_median_s"] > 0 and step["gflop"] > 0 and 0 < step["compute_fraction"]
    decode = next(r for r in records if r["phase"] == "decode_long")
    assert decode["extra"]["context_tokens"] == 64 + 1 and decode["bound_tokens_per_s"] > 0
    assert "speedup" in result.output and "of the bandwidth bound" in result.output and "same code" in result.output


def test_bench_accounts_7b_on_cpu_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from openbagel.cli import app

    out = tmp_path / "acc.json"
    result = CliRunner().invoke(app, ["bench", "--config", "7b-mot", "--size", "512", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "not run on a CPU" in result.output
    acc = json.loads(out.read_text())[0]
    # 7B-MoT: 28 layers x 2 (k, v) x 4 KV heads x 128 x 2 bytes; 32x32 latent tokens at 512 px
    assert acc["kv_bytes_per_token_bf16"] == 28 * 2 * 4 * 128 * 2 and acc["latent_tokens"] == 1024
    assert 13e9 < acc["decode_bytes_per_token_bf16"] < 16e9  # about 7B active parameters
    for args, message in (
        (["--config", "huge"], "unknown config 'huge'; choose from tiny, small, 7b-mot"),
        (["--config", "tiny", "--task", "paint"], "unknown task 'paint'"),
        (["--config", "tiny", "--long-context", "-5"], "long context must be a whole number from 1 to 1000000"),
        (["--config", "tiny", "--batch", "100"], "batch must be a whole number from 1 to 64"),
    ):
        result = CliRunner().invoke(app, ["bench", *args])
        assert result.exit_code == 2 and message in result.output, result.output


# --- static-shape decoding (torch.compile) ---------------------------------------------------


def test_static_decoder_equals_decoding_and_compiles_without_graph_breaks(pipe):
    from openbagel.inference.static_decode import StaticDecoder

    s = _edit_session(pipe)
    no_eos = type(s.special)(s.special.bos, -1, s.special.start_of_image, s.special.end_of_image)
    params = TextSampling(max_new_tokens=6)
    ref_logits, static_logits, compiled_logits = [], [], []
    ref = list(decode_tokens(pipe.model, s.decoding_context(6), no_eos, params, on_logits=ref_logits.append))
    static = StaticDecoder(pipe.model)
    out = list(
        decode_tokens(pipe.model, s.decoding_context(6), no_eos, params, on_logits=static_logits.append, static=static)
    )
    torch.testing.assert_close(torch.stack(static_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-5)
    assert_clear_argmax(ref_logits)  # so the static and compiled decoders' greedy tokens cannot differ by rounding
    assert out == ref
    # fullgraph=True: dynamo fails on any graph break (the eager backend keeps the test fast)
    compiled = StaticDecoder(pipe.model, compile=True, backend="eager")
    out = list(compiled.decode(s.decoding_context(6), no_eos, params, on_logits=compiled_logits.append))
    torch.testing.assert_close(torch.stack(compiled_logits), torch.stack(ref_logits), rtol=1e-5, atol=1e-5)
    assert out == ref


def test_pipeline_compile_uses_the_static_decoder(pipe, monkeypatch):
    from openbagel.inference.static_decode import StaticDecoder

    answer = pipe.understand(None, "hello", max_new_tokens=5).text
    calls = []
    orig = StaticDecoder.decode
    monkeypatch.setattr(StaticDecoder, "decode", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    monkeypatch.setattr(pipe, "decoder", StaticDecoder(pipe.model))
    assert pipe.understand(None, "hello", max_new_tokens=5).text == answer and calls


def test_decoding_layout_keeps_the_numbers():
    from openbagel.bench import build_random, special_ids
    from openbagel.config import preset

    model, _ = build_random(preset("tiny-golden"), torch.float32, torch.device("cpu"))  # the layout is applied
    head = model.language_model.lm_head.weight
    assert head.stride() == (1, head.shape[0])  # column-major [vocab, D]
    hidden = torch.randn(3, head.shape[1], generator=torch.Generator().manual_seed(0))
    ref = hidden @ head.contiguous().T
    torch.testing.assert_close(model.logits(hidden), ref, rtol=1e-5, atol=1e-5)
    assert special_ids(300).eos == 297
