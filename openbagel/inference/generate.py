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
from openbagel.inference.denoise import BatchedQuery, ParallelQuery
from openbagel.inference.sampling import (
    ImageSampling,
    TextSampling,
    combine_guidance,
    euler_step,
    flow_schedule,
    guidance_active,
    next_token,
)
from openbagel.inference.session import FULL, IMAGE_FREE, TEXT_FREE, Context, Session, append
from openbagel.inference.static_decode import StaticDecoder
from openbagel.inference.step_cache import StepCacheSettings, TaylorStepCache
from openbagel.model.bagel import Bagel
from openbagel.packing import SpecialIds, flattened_position_ids, latent_segment, text_segment
from openbagel.placement import branch_replicas


def decode_tokens(
    model: Bagel,
    ctx: Context,
    special: SpecialIds,
    params: TextSampling,
    generator: torch.Generator | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
    plain: bool = False,
    static: StaticDecoder | None = None,
) -> Iterator[int]:
    """Decode from ``ctx`` one token at a time; yields the new token ids.

    Starts from ``<|im_start|>`` at the context's rotary position, appends each
    token to ``ctx`` (pass a fork or :meth:`Session.decoding_context` to keep
    the original), stops before yielding ``<|im_end|>`` or after
    ``params.max_new_tokens`` tokens (spec section 5).

    Each step costs O(1) bookkeeping besides attention itself: room for every
    token is reserved once, the token and position tensors are reused, and a
    single query needs no mask. ``plain=True`` builds a packed segment per
    token instead (the reference's way; for benchmarks).

    Args:
        on_logits: called with the ``[vocab]`` float logits of every step.
    Raises:
        NumericalError: NaN/Inf logits.
    """
    if static is not None and not plain:
        yield from static.decode(ctx, special, params, generator, on_logits)
        return
    if not plain:
        ctx.cache.reserve(params.max_new_tokens)
        ids = torch.tensor([special.bos], device=ctx.device)
        pos = torch.tensor([ctx.rope], device=ctx.device)
    token = special.bos
    for _ in range(params.max_new_tokens):
        if plain:
            hidden = append(model, ctx, text_segment([token], ctx.rope, ctx.device), 1)
        else:
            hidden = model.decode_step(ids, pos, ctx.cache)
            ctx.cache.commit(1)
            ctx.rope += 1
            pos += 1
        logits = model.logits(hidden[-1:])[0]
        token = next_token(logits, params, generator, on_logits)
        if token == special.eos:
            return
        if not plain:
            ids.fill_(token)
        yield token


@dataclass
class FlowStep:
    """What one denoising step computed (for callbacks and tests).

    ``index`` counts from 0 to ``num_steps - 1``; ``x`` is the step's input
    latent ``[n, C]``; ``v`` the guided velocity; ``v_text_free``/``v_image_free``
    are ``None`` when that guidance was off (``v_image_free`` is ``v_cond``
    when the image-free context equals the full one); ``sample`` is the
    sample's index in a batch.
    """

    index: int
    num_steps: int
    t: float
    x: Tensor
    v_cond: Tensor
    v_text_free: Tensor | None
    v_image_free: Tensor | None
    v: Tensor
    sample: int = 0


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
    plain: bool = False,
    step_cache: StepCacheSettings | None = None,
) -> Tensor:
    """Sample an image's latent tokens with the Euler method and guidance (spec section 6).

    Args:
        height, width: output size in pixels, multiples of the latent downsample (16).
        noise: initial ``x`` at t=1 ``[h*w, p*p*z]``; drawn from ``generator`` if None.
        on_step: called after every step with a :class:`FlowStep`.
        progress: show a progress bar over the ``num_timesteps - 1`` steps.
        plain: run every guidance branch as its own forward over a copied
            context, the redundant image-free pass included (the reference's
            way; the baseline of ``openbagel bench``). Same numbers, slower.
        step_cache: skip model passes on some steps (approximate; see
            :mod:`openbagel.inference.step_cache`). Off when None.
    Returns:
        ``[h*w, p*p*z]`` float32 clean latent tokens, row-major over the token grid.
    Raises:
        NumericalError: NaN/Inf latents. CacheBudgetError: no KV-cache room for the query.
    """
    if noise is None:
        noise = draw_noise(model, height, width, generator)
    return generate_latents_batch(
        model, [session], height, width, params, [noise], on_step, progress, plain, step_cache
    )[0]


def draw_noise(model: Bagel, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """The initial latent tokens ``[h*w, p*p*z]`` (float32, standard normal) of an image, from ``generator``."""
    cfg = model.config
    n = (height // cfg.latent_downsample) * (width // cfg.latent_downsample)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn((n, cfg.latent_channels_per_token), generator=generator, device=device)


def generate_latents_batch(
    model: Bagel,
    sessions: list[Session],
    height: int,
    width: int,
    params: ImageSampling,
    noises: list[Tensor],
    on_step: Callable[[FlowStep], None] | None = None,
    progress: bool = False,
    plain: bool = False,
    step_cache: StepCacheSettings | None = None,
) -> list[Tensor]:
    """:func:`generate_latents` for several samples at once, one forward per step for all of them.

    Sample ``j`` conditions on ``sessions[j]`` (the same session may appear
    several times: several seeds of one prompt) and starts from ``noises[j]``.
    Every sample gets its own guidance and renormalisation, so a batch equals
    the single runs with the same noises. ``on_step`` gets one
    :class:`FlowStep` per sample and step (``FlowStep.sample``).

    Returns:
        one ``[h*w, p*p*z]`` float32 latent per sample.
    """
    if len(sessions) != len(noises) or not sessions:
        raise ValueError(f"{len(sessions)} sessions for {len(noises)} noises")
    if plain and len(sessions) > 1:  # the baseline serves one request at a time
        return [
            generate_latents_batch(model, [s], height, width, params, [nz], on_step, progress, True, step_cache)[0]
            for s, nz in zip(sessions, noises)
        ]
    cfg = model.config
    h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
    position_ids = flattened_position_ids(h, w, cfg.max_latent_size, cfg.position_mode)
    device = sessions[0].full.device
    x = torch.stack([nz.float().to(device) for nz in noises])  # [S, n, C]
    special = sessions[0].special

    text_on, image_on = params.guidance_scale > 1.0, params.image_guidance_scale > 1.0
    if plain:
        session = sessions[0]
        contexts = {
            (0, FULL): session.full,
            (0, TEXT_FREE): session.text_free() if text_on else None,  # a copy, as the reference makes
            (0, IMAGE_FREE): session.image_free if image_on else None,  # the full context itself while they are equal
        }
    else:
        branches = {}
        for j, s in enumerate(sessions):
            branches[j, FULL], branches[j, TEXT_FREE] = s.branch(FULL), s.branch(TEXT_FREE)
            if image_on and not s.image_free_is_full:  # built from the session's record only here
                branches[j, IMAGE_FREE] = s.branch(IMAGE_FREE)
        queries: dict[tuple, BatchedQuery | ParallelQuery] = {}
    cache = TaylorStepCache(step_cache) if step_cache is not None else None

    ts = flow_schedule(params.num_timesteps, params.timestep_shift).to(device)
    steps = range(params.num_timesteps - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    for i in steps:
        t, tf = ts[i], float(ts[i])
        active = guidance_active(tf, params.cfg_interval)
        wanted = []
        for j, s in enumerate(sessions):
            wanted.append((j, FULL))
            if active and text_on:
                wanted.append((j, TEXT_FREE))
            if active and image_on and (plain or not s.image_free_is_full):
                wanted.append((j, IMAGE_FREE))
        run = wanted if cache is None else cache.to_compute(i, wanted)
        v: dict[tuple, Tensor] = {}
        if plain:
            for key in run:
                v[key] = latent_velocity(model, contexts[key], x[key[0]], t, position_ids, special)
        elif run:
            key = tuple(run)
            if key not in queries:
                replicas = branch_replicas(model)
                chosen = [branches[k] for k in run]
                queries[key] = (
                    ParallelQuery(replicas, chosen, position_ids, special)
                    if len(replicas) > 1 and len(chosen) > 1
                    else BatchedQuery(model, chosen, position_ids, special)
                )
            out = queries[key].velocities(x[[j for j, _ in run]], t)
            v.update(zip(run, out))
        if cache is not None:  # each branch keeps its own history
            for key in wanted:
                if key in v:
                    cache.record(key, tf, v[key])
                else:
                    v[key] = cache.predict(key, tf)
        new_x = []
        for j in range(len(sessions)):
            v_c, v_t = v[(j, FULL)], v.get((j, TEXT_FREE))
            v_i = v.get((j, IMAGE_FREE), v_c) if active and image_on else None
            guided = combine_guidance(
                v_c,
                v_t,
                v_i,
                params.guidance_scale if active else 1.0,
                params.image_guidance_scale if active else 1.0,
                params.cfg_renorm_type,
                params.cfg_renorm_min,
            )
            if on_step is not None:
                on_step(FlowStep(i, params.num_timesteps - 1, tf, x[j], v_c, v_t, v_i, guided, sample=j))
            new_x.append(euler_step(x[j], guided, ts[i], ts[i + 1]))
        x = torch.stack(new_x)
    if not torch.isfinite(x).all():
        raise NumericalError(
            "image generation produced NaN/Inf values; lower extreme settings (guidance, shift) or check the weights"
        )
    return list(x.unbind(0))
