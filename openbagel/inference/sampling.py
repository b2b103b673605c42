"""Pure sampling maths: token sampling, the flow schedule, the Euler step, and
classifier-free guidance with renormalisation (spec sections 5 and 6)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from openbagel.config import ImageSampling, RenormType
from openbagel.errors import InvalidInputError, NumericalError

__all__ = [
    "ImageSampling",
    "TextSampling",
    "combine_guidance",
    "euler_step",
    "flow_schedule",
    "guidance_active",
    "next_token",
    "sample_token",
]


@dataclass(frozen=True)
class TextSampling:
    """Text decoding settings (transformers' ``generate`` names).

    ``max_new_tokens`` counts generated tokens; ``do_sample=False`` is greedy.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidInputError(f"{name} must be a finite number, got {v!r}")
        if not isinstance(self.do_sample, bool):
            raise InvalidInputError(f"do_sample must be True or False, got {self.do_sample!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InvalidInputError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise InvalidInputError(
                f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False for greedy decoding"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")


# --- text --------------------------------------------------------------------------


#: Temperatures below this (float32's smallest normal number) decode greedily,
#: the limit of sampling as the temperature goes to 0: below it the scaled
#: logits would be computed as ``0 / 0`` (NaN) for the best token.
GREEDY_BELOW_TEMPERATURE = torch.finfo(torch.float32).tiny


def sample_token(logits: Tensor, params: TextSampling, generator: torch.Generator | None = None) -> int:
    """Next token from ``[vocab]`` logits: argmax, or temperature + top-p (nucleus) sampling.

    A temperature below :data:`GREEDY_BELOW_TEMPERATURE` (about 1.2e-38) is
    greedy, so every accepted temperature gives a well-defined draw.
    """
    if not params.do_sample or params.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    logits = logits.float()
    # subtracting the max first keeps tiny temperatures finite (the best token gets exp(0))
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the best token)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        drop[0] = False  # a top_p below float32 resolution must not drop everything
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    device = generator.device if generator is not None else probs.device
    return int(torch.multinomial(probs.to(device), 1, generator=generator))


def next_token(
    logits: Tensor,
    params: TextSampling,
    generator: torch.Generator | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
) -> int:
    """One decoding step's choice: check the ``[vocab]`` logits, report them, sample.

    Raises:
        NumericalError: NaN/Inf logits.
    """
    if not torch.isfinite(logits.sum()):  # one reduction: NaN or Inf anywhere shows in the sum
        raise NumericalError("the model produced NaN/Inf logits; the weights or the settings are out of range")
    if on_logits is not None:
        on_logits(logits)
    return sample_token(logits, params, generator)


# --- flow -------------------------------------------------------------------------


def flow_schedule(num_timesteps: int, shift: float) -> Tensor:
    """The ``num_timesteps`` shifted schedule points from 1 to 0, float32.

    ``t = linspace(1, 0, N)``, then ``t' = s*t / (1 + (s-1)*t)`` (SD3's shift;
    BAGEL ``generate_image``). The steps are the ``N-1`` gaps.
    """
    t = torch.linspace(1, 0, num_timesteps)
    return shift * t / (1 + (shift - 1) * t)


def euler_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step of the rectified flow towards t=0: ``x - v * (t - t_next)``."""
    return x - v * (t - t_next)


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """Guidance applies while ``lo < t <= hi``."""
    return interval[0] < t <= interval[1]


def _clamped_ratio(ref: Tensor, x: Tensor, lo: float, per_token: bool) -> Tensor:
    if per_token:
        n_ref, n_x = ref.norm(dim=-1, keepdim=True), x.norm(dim=-1, keepdim=True)
    else:
        n_ref, n_x = ref.norm(), x.norm()
    return (n_ref / (n_x + 1e-8)).clamp(min=lo, max=1.0)


def combine_guidance(
    v: Tensor,
    v_text_free: Tensor | None,
    v_image_free: Tensor | None,
    guidance_scale: float,
    image_guidance_scale: float,
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """Classifier-free guidance over the three contexts, then renormalisation.

    ``a = v_t + g_text*(v - v_t)`` (or ``a = v`` when text guidance is off),
    ``b = v_i + g_img*(a - v_i)`` (or ``b = a`` when image guidance is off).
    Renorm: ``global``/``channel`` scale ``b`` by ``clamp(|v|/|b|, min, 1)``
    over all numbers / per token; ``text_channel`` applies the per-token clamp
    to ``a`` before image guidance and none after (BAGEL ``_forward_flow``).

    A guidance scale <= 1 means off; the matching velocity may be ``None``.
    Unlike the reference, image guidance applies even with text guidance off
    (the reference skips all guidance then).

    Args:
        v, v_text_free, v_image_free: ``[n, C]`` velocities of the full,
            text-free and image-free contexts.
    Returns:
        ``[n, C]`` guided velocity.
    """
    text_on, image_on = guidance_scale > 1.0, image_guidance_scale > 1.0
    if not (text_on or image_on):
        return v
    a = v_text_free + guidance_scale * (v - v_text_free) if text_on else v
    if renorm_type == "text_channel":
        if text_on:
            a = a * _clamped_ratio(v, a, renorm_min, per_token=True)
        return v_image_free + image_guidance_scale * (a - v_image_free) if image_on else a
    b = v_image_free + image_guidance_scale * (a - v_image_free) if image_on else a
    return b * _clamped_ratio(v, b, renorm_min, per_token=renorm_type == "channel")
