"""Noising and losses of BAGEL's training step (spec section 8). The model
stays pure: these functions take its outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """``s*t / (1 + (s-1)*t)``: the timestep shift (1.0 = none)."""
    return shift * t / (1 + (shift - 1) * t)


def timesteps_from_logits(logits: Tensor, shift: float = 1.0) -> Tensor:
    """Training flow times from raw normal draws: ``shift(sigmoid(n))``.

    ``n ~ N(0, 1)`` per noisy image (``-inf`` gives t = 0, a clean image).
    """
    return shift_timesteps(torch.sigmoid(logits), shift)


def add_noise(clean: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified-flow noising ``x_t = (1-t)*x_0 + t*noise``.

    Args:
        clean: ``[n, C]`` clean latent tokens ``x_0``.
        noise: ``[n, C]`` Gaussian noise.
        t: ``[n]`` flow time of each token.
    Returns:
        ``(x_t, target)`` with the velocity target ``noise - x_0``.
    """
    t = t[:, None].to(clean.dtype)
    return (1 - t) * clean + t * noise, noise - clean


def cross_entropy_per_token(logits: Tensor, labels: Tensor) -> Tensor:
    """``[n]`` cross-entropy of ``[n, vocab]`` logits against ``[n]`` labels (float32)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def mse_per_element(pred: Tensor, target: Tensor) -> Tensor:
    """``[n, C]`` squared error of predicted velocities (float32)."""
    return (pred.float() - target.float()) ** 2


def reduce_losses(
    ce: Tensor,
    mse: Tensor,
    num_ce_tokens: int,
    num_mse_tokens: int,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Means as the reference takes them: CE summed over tokens / number of CE
    tokens, MSE averaged over channels, summed over tokens / number of MSE
    tokens. Pass the token counts of all ranks so every rank has the same scale.
    Empty ``ce`` (``[0]``) or ``mse`` (``[0, C]``) give a loss of 0.

    Returns:
        ``(total, ce_mean, mse_mean)``, with ``total = ce_weight*ce + mse_weight*mse``.
    """
    ce_mean = ce.sum() / max(num_ce_tokens, 1)
    mse_mean = mse.mean(-1).sum() / max(num_mse_tokens, 1) if mse.numel() else mse.sum()
    return ce_weight * ce_mean + mse_weight * mse_mean, ce_mean, mse_mean
