"""Host side: turn text ids, ViT pixels and VAE latents into packed
:class:`~openbagel.model.bagel.SequenceInput` segments, with their rotary
positions and attention masks. No ``nn.Module`` here.

Context segments (spec section 4):

=============  ===========================================  ================  ==========
segment        tokens                                       rotary positions  attention
=============  ===========================================  ================  ==========
text           ``[BOS] text [EOS]``                         counting up       causal
ViT image      ``<|vision_start|> N ViT <|vision_end|>``    one shared, +1    full
VAE image      ``<|vision_start|> h*w latents <|vision_end|>``  one shared, +1    full
=============  ===========================================  ================  ==========

In our sequences the two image markers come before the latent tokens
(understanding tokens first, see :func:`~openbagel.model.layers.by_expert`);
inside a fully attended segment at one rotary position the order does not
change any result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from openbagel.model.attention import AttnMask
from openbagel.model.bagel import SequenceInput


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the contexts need."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


# --- pixels and latents -> tokens ------------------------------------------------


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """``[C, H, W]`` -> ``[(H/p)*(W/p), p*p*C]`` patches, row-major, features ``(row, col, channel)``."""
    c, h, w = pixels.shape
    x = pixels.reshape(c, h // patch, patch, w // patch, patch)
    return x.permute(1, 3, 2, 4, 0).reshape((h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: Tensor, h: int, w: int, patch: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[h*w, p*p*C]`` -> ``[C, h*p, w*p]``."""
    c = tokens.shape[1] // (patch * patch)
    x = tokens.reshape(h, w, patch, patch, c)
    return x.permute(4, 0, 2, 1, 3).reshape(c, h * patch, w * patch)


def flattened_position_ids(
    h: int, w: int, max_side: int, mode: Literal["extrapolate", "interpolate"] = "extrapolate"
) -> Tensor:
    """Position ids ``[h*w]`` of an ``h x w`` grid of patches in a ``max_side`` table.

    ``extrapolate`` (the checkpoint's): ``row*max_side + col``. ``interpolate``:
    fractional coordinates ``i/h``, ``j/w`` bucketed onto the ``max_side`` grid
    (the reference's other mode).
    """
    if mode == "extrapolate":
        rows, cols = torch.arange(h), torch.arange(w)
    elif mode == "interpolate":
        bounds = torch.arange(1 / max_side, 1.0, 1 / max_side)
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), bounds, right=True)
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), bounds, right=True)
    else:
        raise ValueError(f"unknown position mode {mode!r}")
    return (rows[:, None] * max_side + cols[None, :]).flatten()


# --- context segments -------------------------------------------------------------


def text_segment(ids: list[int] | Tensor, rope: int, device: torch.device | str = "cpu") -> SequenceInput:
    """A causal text segment at positions ``rope, rope+1, ...`` (ids already include BOS/EOS)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    n = ids.shape[0]
    return SequenceInput(
        positions=torch.arange(rope, rope + n, device=device),
        mask=AttnMask.causal(),
        num_und=n,
        text_ids=ids,
        text_indexes=torch.arange(n, device=device),
    )


def vit_segment(patches: Tensor, position_ids: Tensor, rope: int, special: SpecialIds) -> SequenceInput:
    """``[<|vision_start|>, N ViT tokens, <|vision_end|>]`` at one position, full attention."""
    device = patches.device
    n = patches.shape[0]
    return SequenceInput(
        positions=torch.full((n + 2,), rope, dtype=torch.long, device=device),
        mask=AttnMask.full(),
        num_und=n + 2,
        text_ids=torch.tensor([special.start_of_image, special.end_of_image], device=device),
        text_indexes=torch.tensor([0, n + 1], device=device),
        vit_patches=patches,
        vit_position_ids=position_ids.to(device),
        vit_seq_lens=[n],
        vit_indexes=torch.arange(1, n + 1, device=device),
    )


def latent_segment(
    latents: Tensor, timestep: float | Tensor, position_ids: Tensor, rope: int, special: SpecialIds
) -> SequenceInput:
    """``<|vision_start|>, <|vision_end|>`` then ``n`` latent tokens, at one position, full attention.

    Used both for a clean VAE image in the context (``timestep`` 0) and for an
    image-generation query (noisy latents at flow time ``timestep``).
    """
    device = latents.device
    n = latents.shape[0]
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1).expand(n)
    return SequenceInput(
        positions=torch.full((n + 2,), rope, dtype=torch.long, device=device),
        mask=AttnMask.full(),
        num_und=2,
        text_ids=torch.tensor([special.start_of_image, special.end_of_image], device=device),
        text_indexes=torch.tensor([0, 1], device=device),
        latents=latents,
        latent_timesteps=t,
        latent_position_ids=position_ids.to(device),
        latent_indexes=torch.arange(2, n + 2, device=device),
    )


# --- training masks -----------------------------------------------------------------


def sample_attention_mask(split_lens: list[int], modes: list[str]) -> Tensor:
    """Bool ``[S, S]`` attention mask of one packed training sample (True = may attend).

    ``causal`` splits see earlier splits and themselves causally; ``full`` and
    ``noise`` splits see earlier splits and all of themselves; no token sees a
    ``noise`` split except that split itself (spec section 8).
    """
    total = sum(split_lens)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n, mode in zip(split_lens, modes):
        end = start + n
        mask[start:end, :start] = True
        block = torch.ones(n, n, dtype=torch.bool)
        mask[start:end, start:end] = block.tril() if mode == "causal" else block
        start = end
    start = 0
    for n, mode in zip(split_lens, modes):
        end = start + n
        if mode == "noise":
            mask[:, start:end] = False
            mask[start:end, start:end] = True
        start = end
    return mask
