"""Pure sampling maths: schedule, Euler, guidance and renorm, token sampling."""

from __future__ import annotations

import pytest
import torch

from openbagel import InvalidInputError
from openbagel.inference.sampling import (
    ImageSampling,
    TextSampling,
    combine_guidance,
    euler_step,
    flow_schedule,
    guidance_active,
    sample_token,
)


def test_flow_schedule_matches_golden(golden_dir):
    from safetensors.torch import load_file

    ref = load_file(str(golden_dir / "case3_t2i_64x64.safetensors"))["timesteps"]
    ts = flow_schedule(10, 3.0)
    assert ts.shape == (10,) and ts[0] == 1.0 and ts[-1] == 0.0
    torch.testing.assert_close(ts[:-1], ref, rtol=0, atol=0)
    # shift 1 is the plain linspace
    torch.testing.assert_close(flow_schedule(5, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_euler_and_interval():
    x, v = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(euler_step(x, v, torch.tensor(0.5), torch.tensor(0.25)), torch.full((2, 3), 0.5))
    assert guidance_active(1.0, (0.4, 1.0)) and not guidance_active(0.4, (0.4, 1.0))
    assert guidance_active(0.41, (0.4, 1.0)) and not guidance_active(0.2, (0.4, 1.0))


def _vs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g) for _ in range(3)]


def test_global_renorm_by_hand():
    v, vt, vi = _vs()
    out = combine_guidance(v, vt, vi, 4.0, 1.5, "global", 0.0)
    a = vt + 4 * (v - vt)
    b = vi + 1.5 * (a - vi)
    expect = b * min(1.0, (v.norm() / (b.norm() + 1e-8)).item())
    torch.testing.assert_close(out, expect)
    assert out.norm() <= v.norm() * (1 + 1e-6)


def test_channel_renorm_by_hand():
    v, vt, vi = _vs()
    out = combine_guidance(v, vt, vi, 3.0, 1.0, "channel", 0.5)
    a = vt + 3 * (v - vt)
    scale = (v.norm(dim=-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.5, 1.0)
    torch.testing.assert_close(out, a * scale)


def test_text_channel_renorm_by_hand():
    v, vt, vi = _vs()
    out = combine_guidance(v, vt, vi, 4.0, 2.0, "text_channel", 0.0)
    a = vt + 4 * (v - vt)
    a = a * (v.norm(dim=-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(out, vi + 2 * (a - vi))


def test_guidance_off_and_image_only():
    v, vt, vi = _vs()
    assert torch.equal(combine_guidance(v, None, None, 1.0, 1.0), v)
    assert torch.equal(combine_guidance(v, None, None, 0.5, 0.2), v)  # below 1 = off
    # text guidance 1, image guidance 2: we apply image guidance (the reference skips it)
    out = combine_guidance(v, None, vi, 1.0, 2.0, "global")
    b = vi + 2 * (v - vi)
    torch.testing.assert_close(out, b * min(1.0, (v.norm() / b.norm()).item()))
    assert not torch.allclose(out, v)


def test_image_sampling_validation():
    with pytest.raises(InvalidInputError, match="num_timesteps must be at least 2"):
        ImageSampling(num_timesteps=1)
    with pytest.raises(InvalidInputError, match="cfg_renorm_type"):
        ImageSampling(cfg_renorm_type="bogus")
    with pytest.raises(InvalidInputError, match="cfg_interval"):
        ImageSampling(cfg_interval=(0.9, 0.1))
    with pytest.raises(InvalidInputError, match="cfg_interval"):
        ImageSampling(cfg_interval=(float("nan"), 1.0))
    with pytest.raises(InvalidInputError, match="guidance_scale must be a finite number"):
        ImageSampling(guidance_scale=float("nan"))
    with pytest.raises(InvalidInputError, match="timestep_shift must be a finite number"):
        ImageSampling(timestep_shift=float("inf"))
    with pytest.raises(InvalidInputError, match=r"cfg_renorm_min must be in \[0, 1\]"):
        ImageSampling(cfg_renorm_min=1.5)


def test_sample_token():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, TextSampling()) == 1
    # top_p small keeps only the best token
    p = TextSampling(do_sample=True, temperature=1.0, top_p=0.1)
    assert {sample_token(logits, p, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    # same seed, same draw; temperature spreads the draws over the top two
    # at temperature 5 the probabilities are .334, .328, .187, .150: top_p 0.8 drops the last
    q = TextSampling(do_sample=True, temperature=5.0, top_p=0.8)
    draws = [sample_token(logits, q, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == [sample_token(logits, q, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) <= {0, 1, 2} and {1, 2} <= set(draws)
    # extreme but valid settings stay finite
    tiny_t = TextSampling(do_sample=True, temperature=1e-40)
    assert sample_token(logits, tiny_t, torch.Generator().manual_seed(0)) == 1
    tiny_p = TextSampling(do_sample=True, top_p=1e-50)
    assert sample_token(logits, tiny_p, torch.Generator().manual_seed(0)) == 1
    with pytest.raises(InvalidInputError, match="temperature"):
        TextSampling(do_sample=True, temperature=0)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45, 1e-39])
def test_tiny_temperatures_decode_greedily(temperature):
    # below float32's smallest normal number the scaled logits were 0/0 = NaN
    # and torch.multinomial raised; the limit of sampling as t -> 0 is greedy
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    p = TextSampling(do_sample=True, temperature=temperature)
    assert [sample_token(logits, p, torch.Generator().manual_seed(s)) for s in range(5)] == [1] * 5
    with pytest.raises(InvalidInputError, match="top_p"):
        TextSampling(top_p=0)
