"""The loss of one packed batch (BAGEL-SPEC section 8).

VAE images are encoded without gradients (the reference samples the
posterior), images to generate are noised at logit-normal times with the
training shift, and the model's outputs give cross-entropy on the chosen
text tokens and MSE between predicted and true velocity on the noisy latent
tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openbagel.model.bagel import Bagel, SequenceInput
from openbagel.model.vae import BagelVAE
from openbagel.packing import patchify
from openbagel.train.losses import (
    add_noise,
    cross_entropy_per_token,
    mse_per_element,
    reduce_losses,
    timesteps_from_logits,
)
from openbagel.train.packing import PackedBatch


@dataclass
class Losses:
    """Losses of one batch: ``total = ce_weight*ce + mse_weight*mse`` (scalars),
    the per-token terms, and the token counts they were normalised by."""

    total: Tensor
    ce: Tensor
    mse: Tensor
    ce_per_token: Tensor
    mse_per_element: Tensor


class TrainForward(nn.Module):
    """The model and both heads in one ``forward``, so a data-parallel wrapper
    (DDP, FSDP) sees every parameter used inside its forward.

    ``forward(inp, ce_slots, mse_slots)`` -> ``(logits [n_ce, vocab], velocities [n_mse, C])``.
    """

    def __init__(self, model: Bagel):
        super().__init__()
        self.model = model

    def forward(self, inp: SequenceInput, ce_slots: Tensor, mse_slots: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(inp)
        return self.model.logits(hidden[ce_slots]), self.model.velocity(hidden[mse_slots])


def pad_images(images: list[Tensor]) -> Tensor:
    """``[N, 3, H_max, W_max]``: images top-left aligned on zeros (the reference's padding)."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    out = torch.zeros(len(images), 3, h, w)
    for k, img in enumerate(images):
        out[k, :, : img.shape[1], : img.shape[2]] = img
    return out


@torch.no_grad()
def clean_latent_tokens(
    vae: BagelVAE,
    batch: PackedBatch,
    patch: int,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Encode the batch's VAE images as one padded batch and cut out each image's
    latent tokens ``[n_lat, p*p*z]`` (natural order). Samples the posterior, as the
    reference does, from ``generator`` or the explicit ``noise``."""
    if not batch.vae_images:
        return torch.zeros(0, patch * patch * vae.cfg.z_channels)
    device = next(vae.parameters()).device
    latent = vae.encode(pad_images(batch.vae_images).to(device), sample=True, generator=generator, noise=noise).float()
    return torch.cat(
        [patchify(lat[:, : h * patch, : w * patch], patch) for lat, (h, w) in zip(latent, batch.vae_latent_shapes)]
    )


def compute_losses(
    model: Bagel,
    vae: BagelVAE,
    batch: PackedBatch,
    *,
    timestep_shift: float = 1.0,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
    num_ce_tokens: int | None = None,
    num_mse_tokens: int | None = None,
    generator: torch.Generator | None = None,
    image_logits: Tensor | None = None,
    flow_noise: Tensor | None = None,
    vae_noise: Tensor | None = None,
    forward: Callable[[SequenceInput, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> Losses:
    """Forward one packed batch and return its losses (differentiable in the model).

    Args:
        timestep_shift: the training shift (1.0 = none; inference uses 3.0).
        num_ce_tokens, num_mse_tokens: the normalisers; pass the counts summed
            over all ranks (and accumulation steps) so every part has the same
            scale. Default: this batch's counts.
        generator: source of all randomness below when not given explicitly.
        image_logits: ``[n_vae_images]`` normal draws giving each generated image's
            time ``shift(sigmoid(n))``; entries of clean images are ignored.
        flow_noise: ``[n_lat, p*p*z]`` Gaussian noise of the flow.
        vae_noise: ``[n_vae_images, z, H/8, W/8]`` posterior sample noise.
        forward: a :class:`TrainForward` of ``model``, possibly wrapped for data
            parallelism; default ``TrainForward(model)``.

    A batch without CE tokens or without MSE tokens is normal: that loss is 0.
    """
    p = model.config.latent_patch_size
    device = model.vae2llm.weight.device
    clean = clean_latent_tokens(vae, batch, p, generator, vae_noise).to(device)
    n_images = len(batch.vae_images)
    if image_logits is None:
        image_logits = torch.randn(n_images, generator=generator)
    loss_image = torch.tensor(batch.vae_loss, dtype=torch.bool)
    logits = torch.where(loss_image, image_logits.float().cpu(), torch.tensor(float("-inf")))
    per_image_t = timesteps_from_logits(logits, timestep_shift)
    counts = torch.tensor([h * w for h, w in batch.vae_latent_shapes], dtype=torch.long)
    t = per_image_t.repeat_interleave(counts).to(device) if n_images else torch.zeros(0, device=device)
    if flow_noise is None:
        flow_noise = torch.randn(clean.shape, generator=generator)
    x_t, target = add_noise(clean, flow_noise.to(device), t)

    inp, slot = batch.model_input(x_t, t, device)
    forward = forward or TrainForward(model)
    logits, velocity = forward(inp, slot[batch.ce_indexes.to(device)], slot[batch.mse_indexes.to(device)])

    ce = cross_entropy_per_token(logits, batch.ce_labels.to(device))
    # target rows of the noisy tokens, in the order of mse_indexes (natural order)
    lat_row = torch.empty(batch.length, dtype=torch.long)
    lat_row[batch.latent_indexes] = torch.arange(batch.latent_indexes.numel())
    mse = mse_per_element(velocity, target[lat_row[batch.mse_indexes].to(device)])
    total, ce_mean, mse_mean = reduce_losses(
        ce,
        mse,
        batch.num_ce_tokens if num_ce_tokens is None else num_ce_tokens,
        batch.num_mse_tokens if num_mse_tokens is None else num_mse_tokens,
        ce_weight,
        mse_weight,
    )
    return Losses(total, ce_mean, mse_mean, ce, mse)
