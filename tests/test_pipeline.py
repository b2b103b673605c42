"""The public API on the tiny checkpoint: recipes, contexts and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openbagel import InvalidInputError
from openbagel.inference.generate import generate_latents
from openbagel.inference.sampling import ImageSampling
from openbagel.inference.session import Session
from openbagel.pipeline import check_size, split_reasoning

FAST = dict(num_timesteps=3)


def _px(result):
    return np.asarray(result.image)


def test_text_to_image_is_seeded(pipe):
    a = pipe.text_to_image("a red cube", seed=1, **FAST)
    b = pipe.text_to_image("a red cube", seed=1, **FAST)
    c = pipe.text_to_image("a red cube", seed=2, **FAST)
    assert a.image.size == (64, 64)  # the tiny model's default size
    assert np.array_equal(_px(a), _px(b)) and not np.array_equal(_px(a), _px(c))
    g = pipe.text_to_image("a red cube", generator=torch.Generator().manual_seed(1), **FAST)
    assert np.array_equal(_px(a), _px(g))


def test_size_must_be_multiple_of_16(pipe):
    with pytest.raises(InvalidInputError, match="width 70 is not a multiple of 16; the nearest valid width is 64"):
        pipe.text_to_image("x", height=64, width=70)


def test_size_limit_refused_before_compute(pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pipe.model, "forward", boom)
    with pytest.raises(InvalidInputError, match="exceeds this model's limit of 1024 pixels"):
        pipe.text_to_image("x", height=1040, width=64)


def test_supported_sizes_come_from_the_config(pipe):
    """A model's drawable sizes are in its config; other sizes are refused with
    those numbers, explicit or taken from an input image, before any compute."""
    from dataclasses import replace

    from openbagel import BagelPipeline, config_from_checkpoint, preset
    from openbagel.config import ImageSizes, openbagel_extra
    from openbagel.pipeline import DEFAULT_MODEL

    assert preset("7b-mot").supported_sizes == ImageSizes(16, 1024, 16)  # the published range
    assert pipe.config.image_sizes is None  # a checkpoint without the field: the latent grid's range
    assert pipe.config.supported_sizes == ImageSizes(16, 1024, 16)
    shipped = config_from_checkpoint(DEFAULT_MODEL)
    assert shipped.image_sizes == preset("shapes").image_sizes == ImageSizes(64, 64, 16)
    assert openbagel_extra(shipped)["image_sizes"] == {"min_side": 64, "max_side": 64, "multiple_of": 16}
    small = BagelPipeline(pipe.model, pipe.vae, pipe.tokenizer, replace(pipe.config, image_sizes=ImageSizes(64, 64)))
    with pytest.raises(InvalidInputError, match="^width 128 is not supported: this model draws 64x64 only$"):
        small.text_to_image("x", width=128, height=64)
    # an input read at 80x64 (scaled up to the 64-px minimum side, then snapped): a
    # model that draws one size draws it; one that draws several refuses before compute
    assert small.edit(Image.new("RGB", (64, 48)), "x", **FAST).image.size == (64, 64)
    assert small.predict_frames([Image.new("RGB", (64, 48))] * 2, **FAST).image.size == (64, 64)
    ranged = replace(pipe.config, image_sizes=ImageSizes(32, 128, 32))
    wide = BagelPipeline(pipe.model, pipe.vae, pipe.tokenizer, ranged)
    with pytest.raises(InvalidInputError, match="^the input image is 80x64 at this model's resolution, a size it "):
        wide.edit(Image.new("RGB", (64, 48)), "x")
    with pytest.raises(InvalidInputError, match="^the frames are 80x64 at this model's resolution, a size it "):
        wide.predict_frames([Image.new("RGB", (64, 48))], **FAST)
    assert wide.edit(Image.new("RGB", (64, 48)), "x", width=64, height=64, **FAST).image.size == (64, 64)
    for (h, w), message in {
        (16, 64): "height 16 is too small; the smallest valid height is 32",
        (64, 160): "width 160 exceeds this model's limit of 128 pixels$",
        (64, 80): "width 80 is not a multiple of 32; the nearest valid width is 64",
    }.items():
        with pytest.raises(InvalidInputError, match=message):
            check_size(ranged, h, w)
    with pytest.raises(ValueError, match="image_sizes: min_side 64 exceeds max_side 32"):
        ImageSizes(64, 32)
    with pytest.raises(ValueError, match=r"image_sizes \(sides from 16 to 2048 px, multiples of 16\) must use"):
        replace(pipe.config, image_sizes=ImageSizes(16, 2048))


def test_zero_or_half_sizes(pipe):
    with pytest.raises(InvalidInputError, match="height 0 is too small; the smallest valid height is 16"):
        pipe.text_to_image("x", height=0)
    with pytest.raises(InvalidInputError, match="give both height and width"):
        pipe.edit(Image.new("RGB", (64, 64)), "x", height=64)
    with pytest.raises(InvalidInputError, match="max_new_tokens must be at least 1"):
        pipe.understand(None, "x", max_new_tokens=0)


def test_bad_api_values(pipe):
    with pytest.raises(InvalidInputError, match="seed must be an integer"):
        pipe.text_to_image("x", seed=2**70)
    with pytest.raises(InvalidInputError, match="seed must be an integer"):
        pipe.understand(None, "x", seed="abc")
    with pytest.raises(InvalidInputError, match="height must be an integer"):
        pipe.text_to_image("x", height=64.0, width=64)
    with pytest.raises(InvalidInputError, match="width -16 is too small"):
        pipe.text_to_image("x", height=64, width=-16)
    with pytest.raises(InvalidInputError, match="num_timesteps must be an integer"):
        pipe.text_to_image("x", num_timesteps=2.5)
    with pytest.raises(InvalidInputError, match="cfg_interval must be a pair"):
        pipe.text_to_image("x", cfg_interval=0.4)
    with pytest.raises(InvalidInputError, match="prompt must be a string"):
        pipe.text_to_image(None)
    with pytest.raises(InvalidInputError, match="temperature must be a finite number"):
        pipe.understand(None, "x", do_sample=True, temperature=float("nan"))
    with pytest.raises(InvalidInputError, match="the image is empty"):
        pipe.understand(Image.new("RGB", (0, 0)), "x")
    # a string for `images` is one path, not a list of characters
    with pytest.raises(InvalidInputError, match="image file not found: 'nope.png'"):
        pipe.edit(None, "x", images="nope.png")


def test_bad_devices_and_dtypes():
    from openbagel.pipeline import parse_device, parse_dtype

    for device in ("meta", "xla", "nonsense", None):
        with pytest.raises(InvalidInputError, match="device"):
            parse_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="no CUDA GPU"):
            parse_device("cuda")
    for dtype in ("float16", None, torch.int8):
        with pytest.raises(InvalidInputError, match="not supported"):
            parse_dtype(dtype)
    assert parse_dtype("bf16") is torch.bfloat16


def test_num_timesteps_below_two(pipe):
    with pytest.raises(InvalidInputError, match="num_timesteps must be at least 2"):
        pipe.text_to_image("x", num_timesteps=1)


def test_guidance_below_one_is_off(pipe):
    off = pipe.text_to_image("a red cube", seed=3, guidance_scale=1.0, image_guidance_scale=1.0, **FAST)
    below = pipe.text_to_image("a red cube", seed=3, guidance_scale=0.5, image_guidance_scale=0.0, **FAST)
    on = pipe.text_to_image("a red cube", seed=3, guidance_scale=4.0, **FAST)
    assert np.array_equal(_px(off), _px(below)) and not np.array_equal(_px(off), _px(on))


def test_empty_prompt_is_unconditional(pipe):
    assert pipe.text_to_image("", seed=0, **FAST).image.size == (64, 64)


def test_edit_needs_an_image(pipe):
    with pytest.raises(InvalidInputError, match="edit needs an input image"):
        pipe.edit(None, "make it blue")


def test_edit_output_size_and_odd_inputs(pipe, tmp_path):
    # 64x48 -> VAE resize (256, 64, 16) -> 80x64, as golden case 4
    for mode, color in (("RGB", (10, 200, 30)), ("RGBA", (10, 200, 30, 128)), ("CMYK", (0, 50, 200, 0)), ("L", 90)):
        out = pipe.edit(Image.new(mode, (64, 48), color), "make it blue", seed=0, **FAST)
        assert out.image.size == (80, 64), mode
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)).save(sixteen)
    assert pipe.edit(sixteen, "x", seed=0, **FAST).image.size == (80, 64)
    both = pipe.edit(Image.new("RGB", (64, 64)), "combine", images=[Image.new("RGB", (64, 48))], seed=0, **FAST)
    assert both.image.size == (64, 64)


def test_understand_rejects_non_image(pipe, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(InvalidInputError, match="not an image file"):
        pipe.understand(f, "what is it?")


def test_understand_greedy_matches_stream(pipe):
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    a = pipe.understand(img, "What is in this image?", max_new_tokens=6)
    b = "".join(pipe.understand_stream(img, "What is in this image?", max_new_tokens=6))
    assert a.text == b.strip() and a.reasoning is None


def test_understand_several_images(pipe):
    a, b = Image.new("RGB", (64, 48), (200, 0, 0)), Image.new("RGB", (48, 64), (0, 0, 200))
    assert isinstance(pipe.understand([a, b], "compare", max_new_tokens=4).text, str)
    chat = pipe.chat()
    chat.add_image(a, vae=False)
    assert chat.session.full.cache.length == 32
    chat.add_image(b, vae=False)
    # ViT path only: 64x48 -> 80x64 (VAE resize) -> 84x70 -> 6x5 patches (+2 markers);
    # 48x64 -> 64x80 -> 70x84 -> 5x6 patches (+2); one rotary position each
    assert (chat.session.full.cache.length, chat.session.full.rope) == (64, 2)


def test_split_reasoning():
    assert split_reasoning("<think> plan it </think> the answer ") == ("plan it", "the answer")
    assert split_reasoning("no tags here") == (None, "no tags here")


def test_think_adds_reasoning_to_full_context_only(pipe):
    chat = pipe.chat("system prompt")
    chat.add_text("a cube")
    before_full = chat.session.full.cache.length
    result = chat.generate_image(pipe.image_settings(pipe.config.t2i, num_timesteps=2), think=True, max_think_tokens=5)
    assert isinstance(result.reasoning, str)
    assert chat.session.image_free.cache.length == before_full  # no reasoning, no image
    assert chat.session.full.cache.length > before_full + 5


def _session(pipe):
    return Session(pipe.model, pipe.tokenizer.special)


def test_context_conventions(pipe):
    s = _session(pipe)
    s.add_text([1, 2])  # user text: [BOS] 1 2 [EOS]
    assert (s.full.cache.length, s.full.rope, s.image_free_is_full) == (4, 4, True)
    assert s.text_free().cache.length == 0
    patches = torch.zeros(4, 588)
    s.add_vit_image(patches, torch.arange(4))  # full only; rope +1
    assert (s.full.cache.length, s.full.rope) == (10, 5)
    assert (s.image_free.cache.length, s.image_free.rope) == (4, 4)
    assert (s.text_free().cache.length, s.text_free().rope) == (10, 5)  # refreshed by the image
    s.add_text([3])  # user text
    s.add_text([4, 5], user=False)  # answer: full and image-free
    s.add_text([6], user=False, image_free=False)  # reasoning: full only
    assert (s.full.cache.length, s.image_free.cache.length) == (10 + 3 + 4 + 3, 4 + 3 + 4)
    tf = s.text_free()
    assert (tf.cache.length, tf.rope) == (10, 5)  # before the last user text
    torch.testing.assert_close(tf.cache.keys(1), s.full.cache.keys(1)[:10])


def test_chunked_prefill_is_exact(pipe, monkeypatch):
    import openbagel.inference.session as session_mod

    ids = list(range(40, 90))
    whole = _session(pipe)
    whole.add_text(ids)
    monkeypatch.setattr(session_mod, "PREFILL_CHUNK", 7)
    chunked = _session(pipe)
    chunked.add_text(ids)
    assert chunked.full.rope == whole.full.rope == 52
    torch.testing.assert_close(chunked.full.cache.keys(1), whole.full.cache.keys(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.full.cache.values(1), whole.full.cache.values(1), rtol=1e-5, atol=1e-5)


def test_session_fork_is_independent(pipe):
    s = _session(pipe)
    s.add_text([1, 2, 3])
    branch = s.fork()
    branch.add_vit_image(torch.zeros(4, 588), torch.arange(4))
    branch.add_text([4])
    assert (s.full.cache.length, s.full.rope, s.image_free_is_full) == (5, 5, True)
    assert (branch.full.cache.length, branch.image_free.cache.length) == (5 + 6 + 3, 5 + 3)
    torch.testing.assert_close(branch.full.cache.keys(0)[:5], s.full.cache.keys(0))


def test_image_free_shortcut_equals_separate_context(pipe):
    """While image-free == full, v_i is taken from v; a real separate copy gives the same latents."""
    params = ImageSampling(num_timesteps=3, guidance_scale=4.0, image_guidance_scale=1.5)
    s = _session(pipe)
    s.add_text([10, 20, 30])
    noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    shortcut = generate_latents(pipe.model, s, 64, 64, params, noise=noise)
    s._free_prefix = (s.full.cache.length, s.full.rope)  # same content, built and computed as its own branch
    assert not s.image_free_is_full
    separate = generate_latents(pipe.model, s, 64, 64, params, noise=noise)
    torch.testing.assert_close(shortcut, separate, rtol=1e-5, atol=1e-5)


def test_chat_images_in_and_out(pipe):
    chat = pipe.chat()
    chat.add_text("draw a cube")
    img = chat.generate_image(pipe.image_settings(pipe.config.t2i, num_timesteps=2, seed=0)).image
    n = chat.session.full.cache.length
    chat.add_text("describe it")
    answer = chat.reply()
    assert isinstance(answer, str)
    assert chat.session.full.cache.length > n
    assert img.size == (64, 64)
    # [BOS] text [EOS], then the generated image fed back through both paths:
    # 4x4 latent tokens + 2 markers, and 5x5 ViT patches (64 px -> 70 px at stride 14) + 2 markers
    assert n == 2 + len("draw a cube") + 16 + 2 + 25 + 2


def test_nonfinite_results_are_errors(pipe):
    from openbagel.errors import NumericalError

    with pytest.raises(NumericalError, match="NaN/Inf"):
        pipe.text_to_image("x", guidance_scale=1e300, **FAST)


def test_failed_step_leaves_the_chat_unchanged(pipe, monkeypatch):
    chat = pipe.chat()
    chat.add_text("hello")
    before = (chat.session.full.cache.length, chat.session.full.rope, chat.session.image_free_is_full)
    calls = {"n": 0}
    real = type(pipe.model).forward

    def flaky(self, inp, cache=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the ViT segment, after the VAE segment went in
            raise RuntimeError("out of memory (simulated)")
        return real(self, inp, cache)

    monkeypatch.setattr(type(pipe.model), "forward", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        chat.add_image(Image.new("RGB", (64, 48)))
    monkeypatch.undo()
    assert (chat.session.full.cache.length, chat.session.full.rope, chat.session.image_free_is_full) == before
    chat.add_image(Image.new("RGB", (64, 48)))  # and it still works
    assert chat.session.full.cache.length == before[0] + 22 + 32


def test_api_misuse_is_named(pipe):
    with pytest.raises(InvalidInputError, match="do_sample must be True or False"):
        pipe.understand(None, "x", do_sample="no")
    with pytest.raises(InvalidInputError, match="think must be True or False"):
        pipe.understand(None, "x", think="no")
    with pytest.raises(InvalidInputError, match="pass seed or generator, not both"):
        pipe.text_to_image("x", seed=0, generator=torch.Generator())
    with pytest.raises(InvalidInputError, match="generator must be a torch.Generator"):
        pipe.text_to_image("x", generator=5)
    with pytest.raises(InvalidInputError, match="system_prompt must be a string"):
        pipe.chat(123)
    with pytest.raises(InvalidInputError, match="params must be a TextSampling"):
        pipe.chat().reply({"max_new_tokens": 3})
    with pytest.raises(InvalidInputError, match="settings must come from"):
        pipe.chat().generate_image({"height": 64})


def test_context_length_warning(pipe, caplog):
    chat = pipe.chat()
    with caplog.at_level("WARNING"):
        chat.add_text("a" * 4100)  # the tiny model was trained to 4096 positions
    assert "passed 4096 positions" in caplog.text


def test_image_free_context_is_built_only_for_an_image(pipe):
    """Image, question, reply, then "now draw it": understanding builds no
    image-free context; the generation builds it from the conversation's
    record and gets what building it at every turn (the old way) gives."""
    chats = [pipe.chat(), pipe.chat()]
    for eager, chat in zip((False, True), chats):
        for step in (
            lambda c: c.add_image(Image.new("RGB", (64, 48), "blue")),
            lambda c: c.add_text("what is it?"),
            lambda c: c.reply(pipe.text_sampling(max_new_tokens=3)),
            lambda c: c.add_text("now draw it"),
        ):
            step(chat)
            if eager:
                _ = chat.session.image_free  # build it now, as every text used to
    lazy, eager = (c.session for c in chats)
    assert lazy.cached_tokens == lazy.full.cache.length < eager.cached_tokens  # nothing built yet
    settings = dict(num_timesteps=3, image_guidance_scale=2.0, seed=0)
    images = [np.asarray(c.generate_image(pipe.image_settings(pipe.config.t2i, **settings)).image) for c in chats]
    # the same computations in the same order (only earlier or later): exactly equal
    assert np.array_equal(images[0], images[1])
    assert lazy.cached_tokens == eager.cached_tokens
    assert torch.equal(lazy.image_free.cache.keys(1), eager.image_free.cache.keys(1))


def test_failed_build_of_the_image_free_context_leaves_the_chat_unchanged(pipe, monkeypatch):
    chat = pipe.chat()
    chat.add_image(Image.new("RGB", (64, 48), "blue"))
    chat.add_text("draw it in red")
    before = (chat.session.full.cache.length, chat.session.cached_tokens)
    real = type(pipe.model).forward

    def fail(self, inp, cache=None):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(type(pipe.model), "forward", fail)  # the first pass is the build of the text
    settings = dict(num_timesteps=3, image_guidance_scale=2.0, seed=0)
    with pytest.raises(RuntimeError, match="simulated"):
        chat.generate_image(pipe.image_settings(pipe.config.t2i, **settings))
    monkeypatch.setattr(type(pipe.model), "forward", real)
    assert (chat.session.full.cache.length, chat.session.cached_tokens) == before
    fresh = pipe.chat()
    fresh.add_image(Image.new("RGB", (64, 48), "blue"))
    fresh.add_text("draw it in red")
    images = [c.generate_image(pipe.image_settings(pipe.config.t2i, **settings)).image for c in (chat, fresh)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # the same computation
