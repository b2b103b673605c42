"""The FLUX autoencoder, as diffusers' ``AutoencoderKL``, with BAGEL's latent convention.

BAGEL's latents are ``scale * (z - shift)`` (scale 0.3611, shift 0.1159 for
FLUX); decoding inverts that. The checkpoint's ``ae.safetensors`` uses the
original FLUX key layout; :func:`flux_ae_shapes` lists it and
:func:`to_diffusers_state_dict` converts it with diffusers' LDM-VAE converter,
offline, with the config passed explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from openbagel.config import VAEConfig
from openbagel.quiet import quiet_imports


def _diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.channel_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def flux_ae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an ``ae.safetensors`` in the FLUX layout for ``cfg``."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        out[f"{name}.weight"] = (cout, cin, k, k)
        out[f"{name}.bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def resblock(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix: str, c: int) -> None:
        resblock(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{p}", c, c, 1)
        resblock(f"{prefix}.mid.block_2", c, c)

    ch, mult, nres = cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks
    conv("encoder.conv_in", ch, cfg.in_channels, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            resblock(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * cfg.z_channels, block_in, 3)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", block_in, cfg.z_channels, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            resblock(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", cfg.out_channels, block_in, 3)
    return out


def to_diffusers_state_dict(flux_sd: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Convert a FLUX-layout state dict to diffusers' ``AutoencoderKL`` names (no network)."""
    with quiet_imports():
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(dict(flux_sd), _diffusers_config(cfg))


def to_flux_state_dict(diffusers_sd: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Inverse of :func:`to_diffusers_state_dict`: diffusers names -> the FLUX layout.

    The mapping is read off diffusers' own converter: every FLUX tensor is
    labelled with its index, converted, and the labels found again.
    """
    shapes = flux_ae_shapes(cfg)
    names = list(shapes)
    labelled = {n: torch.full(shapes[n], float(i)) for i, n in enumerate(names)}
    mapping = {d: names[int(t.reshape(-1)[0])] for d, t in to_diffusers_state_dict(labelled, cfg).items()}
    missing = set(diffusers_sd) ^ set(mapping)
    if missing:
        raise ValueError(f"VAE state dict does not fit the FLUX layout: {sorted(missing)[:5]}")
    return {mapping[d]: t.reshape(shapes[mapping[d]]).contiguous() for d, t in diffusers_sd.items()}


class BagelVAE(nn.Module):
    """FLUX autoencoder with BAGEL's latent scaling.

    ``encode``: images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, z, H/8, W/8]``,
    ``scale * (z - shift)``; ``decode`` inverts it. Dtype follows the weights.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        with quiet_imports():
            from diffusers import AutoencoderKL

        self.cfg = cfg
        self.ae = AutoencoderKL(**_diffusers_config(cfg))

    @property
    def dtype(self) -> torch.dtype:
        return self.ae.encoder.conv_in.weight.dtype

    def moments(self, images: Tensor) -> Tensor:
        """Raw encoder output ``[B, 2*z, H/8, W/8]``: posterior mean, then log-variance."""
        return self.ae.encoder(images.to(self.dtype))

    def encode(
        self,
        images: Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Encode to BAGEL latents ``scale * (z - shift)``.

        Args:
            images: ``[B, 3, H, W]`` in [-1, 1], H and W multiples of 8.
            sample: draw ``z = mean + std * eps`` (the reference's behaviour)
                instead of the posterior mean (the deterministic default).
            generator: source of ``eps`` when sampling.
            noise: an explicit ``eps`` ``[B, z, H/8, W/8]``; implies sampling.
        """
        mean, logvar = self.moments(images).chunk(2, dim=1)
        z = mean
        if noise is not None or sample:
            if noise is None:
                device = mean.device if generator is None else generator.device
                noise = torch.randn(mean.shape, generator=generator, device=device)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, latents: Tensor) -> Tensor:
        """BAGEL latents ``[B, z, h, w]`` -> images ``[B, 3, 8h, 8w]``, roughly in [-1, 1]."""
        z = latents.to(self.dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        return self.ae.decode(z).sample
