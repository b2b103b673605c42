"""Building blocks: RMSNorm, SwiGLU, rotary positions, the time embedder, the 2-D
sin-cos position tables, and the MoT routing helper."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: statistics in float32; the result is in the weight's dtype
    (so a float32 residual stream feeds bfloat16 projections directly)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


class SwiGLU(nn.Module):
    """Qwen2 MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def by_expert(x: Tensor, num_und: int, und: Callable[[Tensor], Tensor], gen: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply the understanding expert to ``x[:num_und]`` and the generation expert to the rest.

    The MoT routing helper. Callers order every sequence so that understanding
    tokens (text, ViT, image markers) come first and generation tokens (VAE
    latents) last, so each expert sees one contiguous slice; a query that is
    all one kind takes a single call.

    Args:
        x: ``[L, ...]`` tokens, understanding first.
        num_und: number of understanding tokens, ``0 <= num_und <= L``.
    Returns:
        ``[L, ...]``, the two results concatenated in the same order.
    """
    n = x.shape[0]
    if not torch.is_grad_enabled():
        if num_und >= n:
            return und(x)
        if num_und <= 0:
            return gen(x)
    return torch.cat([und(x[:num_und]), gen(x[num_und:])], dim=0)


# --- rotary positions ------------------------------------------------------


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary tables of Qwen2 (``rotate_half`` layout: frequencies repeated twice).

    Args:
        positions: ``[L]`` int64 rotary positions.
    Returns:
        ``(cos, sin)``, each ``[L, head_dim]`` in ``dtype`` (computed in float32).
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[L, H, D]`` by the tables ``[L, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# --- time embedding --------------------------------------------------------


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """DiT sinusoidal features of ``t`` ``[N]`` (t in [0, 1], not scaled by 1000).

    Returns ``[N, dim]`` float32: cosines first, then sines, with frequencies
    ``exp(-ln(max_period) * i / (dim/2))`` (DiT, Peebles & Xie 2023; BAGEL's
    ``TimestepEmbedder``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``Linear(256 -> D), SiLU, Linear(D -> D)`` over :func:`timestep_features`."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """``t`` ``[N]`` -> ``[N, D]`` in the weights' dtype."""
        feats = timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


# --- fixed 2-D position tables --------------------------------------------


def sincos_2d_table(max_side: int, dim: int) -> Tensor:
    """The fixed 2-D sin-cos table ``[max_side**2, dim]`` (float32).

    Row ``r*max_side + c``: the first half of the channels encodes the column
    ``c``, the second half the row ``r``; each half is ``[sin(p*w_i)] + [cos(p*w_i)]``
    with ``w_i = 10000**(-i/(dim/4))`` (MAE's ``get_2d_sincos_pos_embed``, as
    BAGEL uses it; spec section 1). Computed in float64 like the reference.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(max_side, dtype=torch.float64)
    rows = coords.repeat_interleave(max_side)  # r for row r*max_side + c
    cols = coords.repeat(max_side)  # c

    def encode(p: Tensor) -> Tensor:
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PositionTable(nn.Module):
    """A fixed (non-trained) 2-D sin-cos table looked up by flattened position id.

    The table is a non-persistent buffer named ``pos_embed`` (the checkpoint's
    name): it is rebuilt, never learned, and a loader may check a stored copy.
    """

    def __init__(self, max_side: int, dim: int):
        super().__init__()
        self.max_side = max_side
        self.register_buffer("pos_embed", sincos_2d_table(max_side, dim), persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]
