"""The two generation loops: text decoding and rectified-flow image sampling.

Both read a :class:`~openbagel.inference.session.Session` (or one context)
and never change it: decoding runs on a fork, image queries are not committed
to any cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from openbagel.errors import NumericalError
from openbagel.inference.sampling import (
    ImageSampling,
    TextSampling,
    combine_guidance,
    euler_step,
    flow_schedule,
    guidance_active,
    sample_token,
)
from openbagel.inference.session import Context, Session, append
from openbagel.model.bagel import Bagel
from openbagel.packing import SpecialIds, flattened_position_ids, latent_segment, text_segment


def decode_tokens(
    model: Bagel,
    ctx: Context,
    special: SpecialIds,
    params: TextSampling,
    generator: torch.Generator | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
) -> Iterator[int]:
    """Decode from ``ctx`` one token at a time; yields the new token ids.

    Starts from ``<|im_start|>`` at the context's rotary position, appends each
    token to ``ctx`` (pass a fork to keep the original), stops before yielding
    ``<|im_end|>`` or after ``params.max_new_tokens`` tokens (spec section 5).

    Args:
        on_logits: called with the ``[vocab]`` float logits of every step.
    """
    token = special.bos
    for _ in range(params.max_new_tokens):
        hidden = append(model, ctx, text_segment([token], ctx.rope, ctx.device), 1)
        logits = model.logits(hidden[-1:])[0]
        if not torch.isfinite(logits).all():
            raise NumericalError("the model produced NaN/Inf logits; the weights or the settings are out of range")
        if on_logits is not None:
            on_logits(logits)
        token = sample_token(logits, params, generator)
        if token == special.eos:
            return
        yield token


@dataclass
class FlowStep:
    """What one denoising step computed (for callbacks and tests).

    ``index`` counts from 0 to ``num_steps - 1``; ``x`` is the step's input
    latent ``[n, C]``; ``v`` the guided velocity; ``v_text_free``/``v_image_free``
    are ``None`` when that branch was not run.
    """

    index: int
    num_steps: int
    t: float
    x: Tensor
    v_cond: Tensor
    v_text_free: Tensor | None
    v_image_free: Tensor | None
    v: Tensor


def latent_velocity(
    model: Bagel, ctx: Context, x: Tensor, t: Tensor, position_ids: Tensor, special: SpecialIds
) -> Tensor:
    """Velocity ``[n, C]`` (float32) of noisy latent tokens ``x`` at time ``t`` given ``ctx``.

    The query ``<|vision_start|>, latents, <|vision_end|>`` sits at the context's
    rotary position with full attention; nothing is kept in the cache.
    """
    seg = latent_segment(x.to(ctx.device), t, position_ids, ctx.rope, special)
    hidden = model(seg, ctx.cache)
    return model.velocity(hidden[seg.num_und :])


def generate_latents(
    model: Bagel,
    session: Session,
    height: int,
    width: int,
    params: ImageSampling,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    on_step: Callable[[FlowStep], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample an image's latent tokens with the Euler method and guidance (spec section 6).

    Args:
        height, width: output size in pixels, multiples of the latent downsample (16).
        noise: initial ``x`` at t=1 ``[h*w, p*p*z]``; drawn from ``generator`` if None.
        on_step: called after every step with a :class:`FlowStep`.
        progress: show a progress bar over the ``num_timesteps - 1`` steps.
    Returns:
        ``[h*w, p*p*z]`` float32 clean latent tokens, row-major over the token grid.
    """
    cfg = model.config
    h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
    position_ids = flattened_position_ids(h, w, cfg.max_latent_size, cfg.position_mode)
    if noise is None:
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn((h * w, cfg.latent_channels_per_token), generator=generator, device=device)
    x = noise.float().to(session.full.device)

    text_on, image_on = params.guidance_scale > 1.0, params.image_guidance_scale > 1.0
    text_free = session.text_free() if text_on else None
    image_free = session.image_free if image_on and not session.image_free_is_full else None

    ts = flow_schedule(params.num_timesteps, params.timestep_shift).to(x.device)
    steps = range(params.num_timesteps - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    for i in steps:
        t = ts[i]
        active = guidance_active(float(t), params.cfg_interval)
        v = latent_velocity(model, session.full, x, t, position_ids, session.special)
        v_t = latent_velocity(model, text_free, x, t, position_ids, session.special) if active and text_on else None
        v_i = None
        if active and image_on:
            v_i = v if image_free is None else latent_velocity(model, image_free, x, t, position_ids, session.special)
        guided = combine_guidance(
            v,
            v_t,
            v_i,
            params.guidance_scale if active else 1.0,
            params.image_guidance_scale if active else 1.0,
            params.cfg_renorm_type,
            params.cfg_renorm_min,
        )
        if on_step is not None:
            on_step(FlowStep(i, params.num_timesteps - 1, float(t), x, v, v_t, v_i, guided))
        x = euler_step(x, guided, ts[i], ts[i + 1])
    if not torch.isfinite(x).all():
        raise NumericalError(
            "image generation produced NaN/Inf values; lower extreme settings (guidance, shift) or check the weights"
        )
    return x
