"""The one attention call of the model, with interchangeable backends.

PyTorch's ``scaled_dot_product_attention`` (SDPA) is always available and is
the reference. flash-attn is an optional backend, imported lazily and used
only on 16-bit CUDA tensors without a dense mask (see :func:`set_attention_backend`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MaskKind = Literal["full", "causal", "dense", "flex"]


@dataclass(frozen=True)
class AttnMask:
    """Which keys each query may see.

    * ``full``: every query sees every key (image segments, ViT images).
    * ``causal``: the ``Lq`` queries are the **last** ``Lq`` of the ``Lk`` keys,
      each sees the keys up to and including itself (text after a cached prefix).
    * ``dense``: ``mask`` is a bool ``[Lq, Lk]`` tensor, True where attention is
      allowed (packed training batches on CPU).
    * ``flex``: ``mask`` is a flex-attention ``BlockMask`` (packed training
      batches on GPU: no ``[L, L]`` tensor, fully masked blocks skipped).
    """

    kind: MaskKind = "full"
    mask: Tensor | Any | None = None

    @staticmethod
    def full() -> AttnMask:
        return AttnMask("full")

    @staticmethod
    def causal() -> AttnMask:
        return AttnMask("causal")

    @staticmethod
    def dense(mask: Tensor) -> AttnMask:
        return AttnMask("dense", mask)

    @staticmethod
    def flex(block_mask: Any) -> AttnMask:
        return AttnMask("flex", block_mask)


_BACKEND = "auto"


@functools.cache
def flash_attn_available() -> bool:
    """Whether the optional flash-attn package imports (checked once, lazily)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def set_attention_backend(name: Literal["auto", "sdpa", "flash"]) -> None:
    """Choose the attention backend.

    ``auto`` (default): flash-attn for 16-bit CUDA tensors when it is
    installed, SDPA otherwise. ``sdpa``: always PyTorch's SDPA. ``flash``:
    flash-attn wherever it applies (16-bit CUDA tensors, no dense mask), SDPA elsewhere.

    Raises:
        ValueError: unknown name. ImportError: ``flash`` without flash-attn installed.
    """
    global _BACKEND
    if name not in ("auto", "sdpa", "flash"):
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto', 'sdpa' or 'flash'")
    if name == "flash" and not flash_attn_available():
        raise ImportError("flash-attn is not installed; `pip install flash-attn` on a CUDA machine, or use 'sdpa'")
    _BACKEND = name


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from flash_attn import flash_attn_func

    # flash-attn aligns the causal mask bottom-right, as we want.
    return flash_attn_func(q[None], k[None], v[None], causal=causal)[0]


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex():
    # flex attention is fast only compiled; compiled once per process
    return torch.compile(_eager_flex())


def _use_flash(q: Tensor, mask: AttnMask) -> bool:
    if _BACKEND == "sdpa" or not q.is_cuda or mask.kind == "dense":
        return False
    # flash-attn takes 16-bit floats only
    return q.is_floating_point() and q.element_size() == 2 and flash_attn_available()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: ``[Lq, H, D]`` queries.
        k, v: ``[Lk, Hkv, D]`` keys and values, ``H`` a multiple of ``Hkv``.
        mask: see :class:`AttnMask`.
    Returns:
        ``[Lq, H, D]``.
    """
    lq, lk = q.shape[0], k.shape[0]
    if mask.kind == "flex":
        fn = _compiled_flex() if q.is_cuda else _eager_flex()
        out = fn(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=mask.mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out[0].transpose(0, 1)
    if _use_flash(q, mask):
        return _flash(q, k, v, causal=mask.kind == "causal")
    attn_mask = None
    is_causal = False
    if mask.kind == "dense":
        attn_mask = mask.mask
    elif mask.kind == "causal":
        if lq == lk:
            is_causal = True
        elif lq > 1:  # SDPA's is_causal aligns top-left; queries sit at the end here.
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        # one query at the end sees every key: no mask (nothing built per decoded token)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    # [1, heads, L, D] lets PyTorch pick its fused kernels, on CPU too; 16-bit
    # floats on a CPU stay [heads, L, D] (the math path: the fused CPU kernel
    # loses too much accuracy in bfloat16 to keep greedy tokens)
    fused = q.is_cuda or q.dtype == torch.float32
    if fused:
        q, k, v = q[None], k[None], v[None]
    if not q.is_cuda and h != hkv and not is_causal:
        # Fold the query heads that share a KV head into the query length: the
        # same numbers, and the fused CPU kernel then applies (it has no GQA).
        g = h // hkv
        q = q.reshape(*q.shape[:-3], hkv, g * lq, d)
        attn_mask = None if attn_mask is None else attn_mask.repeat(g, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.view(h, lq, d).transpose(0, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=h != hkv)
    return (out[0] if fused else out).transpose(0, 1)
