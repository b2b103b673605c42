"""The embedded model's autoencoder: the FLUX VAE architecture scaled down
(same key layout, 16 latent channels, 8x downsampling), trained on the
shapes world's images by reconstruction.

``python -m openbagel.shapes.autoencoder OUT_DIR`` trains it and writes
``OUT_DIR/ae.safetensors`` (FLUX layout) and prints the held-out PSNR.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch import Tensor

from openbagel.config import VAEConfig
from openbagel.images import to_tensor
from openbagel.model.vae import BagelVAE
from openbagel.shapes import world

#: The architecture (scale and shift are fitted after training; see :func:`fit_latent_scaling`).
SHAPES_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=16, norm_groups=8)


def world_images(
    rng: random.Random, n: int, size: int = world.IMAGE_SIZE, split: str = "train", style_fraction: float = 0.2
) -> Tensor:
    """``[n, 3, size, size]`` float32 in [-1, 1]: every kind of image the world
    makes: scenes, a ``style_fraction`` of style edits (outline, pixel,
    invert), a fifth of clip frames, in proportion.

    Raises:
        ValueError: ``style_fraction`` outside [0, 0.8] (the clip frames keep their fifth).
    """
    if not 0 <= style_fraction <= 0.8:
        raise ValueError(f"style_fraction must be in [0, 0.8] (clip frames take 0.2), got {style_fraction}")
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.8 - style_fraction:
            img = world.render(world.random_scene(rng, split), size)
        elif u < 0.8:
            img = world.render(world.random_scene(rng, split), size, rng.choice(world.STYLES))
        else:
            clip = world.random_clip(rng, split, size)
            img = clip.render(rng.randrange(len(clip.frames)), size)
        out.append(to_tensor(img))
    return torch.stack(out)


def psnr(vae: BagelVAE, images: Tensor, batch: int = 64) -> float:
    """Reconstruction PSNR in dB (peak 1.0 on [0, 1] pixels) through the posterior mean."""
    se, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(images), batch):
            x = images[k : k + batch]
            y = vae.decode(vae.encode(x)).clamp(-1, 1)
            se += float(((y - x) / 2).pow(2).sum())
            count += x.numel()
    return 10 * math.log10(1.0 / (se / count))


@torch.no_grad()
def fit_latent_scaling(vae: BagelVAE, images: Tensor) -> tuple[float, float]:
    """``(scale_factor, shift_factor)`` making the latents zero-mean, unit-variance
    (how FLUX's constants are defined: ``latent = scale * (z - shift)``)."""
    z = vae.moments(images).chunk(2, dim=1)[0]
    return 1.0 / float(z.std()), float(z.mean())


def train_autoencoder(
    steps: int = 4000,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    kl_weight: float = 1e-6,
    cfg: VAEConfig = SHAPES_VAE,
    progress: bool = True,
    eval_every: int = 500,
    init: BagelVAE | None = None,
    save_to: str | Path | None = None,
    crop: int = 32,
    full_fraction: float = 0.1,
    split: str = "train",
    style_fraction: float = 0.2,
    decoder_only: bool = False,
) -> BagelVAE:
    """Train the autoencoder on fresh world images each step (MSE + 0.1 L1 +
    ``kl_weight`` KL, posterior sampled), AdamW with a cosine schedule; then fit
    the latent scale and shift.

    Args:
        init: continue from this autoencoder instead of a fresh one.
        save_to: folder where ``ae.safetensors`` is written at every evaluation
            (every ``eval_every`` steps) and at the end.
        crop: train on random ``crop`` x ``crop`` crops (4x cheaper at 32 than
            whole 64-px images; the network is convolutional) ...
        full_fraction: ... except for this last fraction of the steps, on whole images.
        split: the world split the images come from (``all``: every colour-shape pair).
        style_fraction: share of style-edited images (outline, pixel, invert) in each batch.
        decoder_only: train the decoder of ``init`` alone: its encoder, latent
            scale and shift, and so the latent space a model was trained on,
            stay as they are (a better decoder needs no retraining of the model).

    Raises:
        ValueError: ``decoder_only`` without ``init``.
    """
    if decoder_only and init is None:
        raise ValueError("decoder_only needs init: the autoencoder whose encoder is kept")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if init is not None:
        vae = init.train()
    else:
        vae = BagelVAE(cfg)
        with torch.no_grad():  # start with a near-deterministic posterior (std e^-6): the decoder
            vae.ae.encoder.conv_out.bias[cfg.z_channels :] = -12.0  # sees clean latents from step 0
    trained = vae.ae.decoder if decoder_only else vae
    vae.ae.encoder.requires_grad_(not decoder_only)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    held_out = world_images(random.Random(seed + 2), 64, split="test")
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="autoencoder", unit="step")
    for step in bar:
        x = world_images(rng, batch, split=split, style_fraction=style_fraction)
        if crop and step < steps * (1 - full_fraction) and crop < x.shape[-1]:
            top, left = rng.randrange(x.shape[-2] - crop + 1), rng.randrange(x.shape[-1] - crop + 1)
            x = x[:, :, top : top + crop, left : left + crop]
        mean, logvar = vae.ae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        y = vae.ae.decoder(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}")
        if progress and eval_every and (step + 1) % eval_every == 0:
            vae.eval()
            bar.write(f"step {step + 1}: held-out PSNR {psnr(vae, held_out):.2f} dB")
            if save_to is not None:
                save_autoencoder(vae, save_to)
            vae.train()
    vae.eval()
    vae.ae.encoder.requires_grad_(True)
    if not decoder_only:
        from dataclasses import replace

        scale, shift = fit_latent_scaling(vae, world_images(random.Random(seed + 1), 256))
        vae.cfg = replace(vae.cfg if init is not None else cfg, scale_factor=scale, shift_factor=shift)
    if save_to is not None:
        save_autoencoder(vae, save_to)
    return vae


def save_autoencoder(vae: BagelVAE, folder: str | Path) -> Path:
    """Write ``ae.safetensors`` in the FLUX key layout (what :func:`openbagel.checkpoint.load_vae` reads),
    atomically and readable as the umask allows (it may be shipped in the package)."""
    from safetensors.torch import save_file

    from openbagel.fileio import write_atomically
    from openbagel.model.vae import to_flux_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in to_flux_state_dict(vae.ae.state_dict(), vae.cfg).items()}
    write_atomically(folder / "ae.safetensors", lambda tmp: save_file(sd, tmp))
    return folder / "ae.safetensors"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train the shapes world's autoencoder.")
    parser.add_argument("out", type=Path, help="folder for ae.safetensors")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this folder's ae.safetensors")
    parser.add_argument("--crop", type=int, default=32, help="train on crops of this size (0 = whole images)")
    parser.add_argument("--full-fraction", type=float, default=0.1, help="last fraction of steps on whole images")
    parser.add_argument("--split", default="train", choices=world.SPLITS, help="world split of the training images")
    parser.add_argument("--style-fraction", type=float, default=0.2, help="share of style-edited images")
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="train only the decoder of --init (its encoder and latent space stay: a model trained on them still fits)",
    )
    args = parser.parse_args()
    init = None
    if args.init is not None:
        from openbagel.checkpoint import load_vae
        from openbagel.config import preset

        init = load_vae(args.init, config=preset("shapes"))  # with the fitted latent scale and shift
    vae = train_autoencoder(
        args.steps,
        args.batch,
        args.lr,
        args.seed,
        init=init,
        save_to=args.out,
        crop=args.crop,
        full_fraction=args.full_fraction,
        split=args.split,
        style_fraction=args.style_fraction,
        decoder_only=args.decoder_only,
    )
    path = args.out / "ae.safetensors"
    held_out = world_images(random.Random(10_000 + args.seed), 512, split="test")
    print(f"wrote {path}")
    kept = " (kept: decoder only)" if args.decoder_only else ""
    print(f"scale_factor={vae.cfg.scale_factor:.6f} shift_factor={vae.cfg.shift_factor:.6f}{kept}")
    print(f"held-out PSNR: {psnr(vae, held_out):.2f} dB")


if __name__ == "__main__":
    main()
