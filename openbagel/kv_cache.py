"""A preallocated key/value cache for every decoder layer.

Keys are stored after rotary embedding. A forward pass writes the keys and
values of its tokens right after the cached ones (:meth:`KVCache.update`) and
attends over the returned views; whether those tokens stay in the cache is
decided afterwards by :meth:`KVCache.commit`. A query that must not be kept (an
image-generation step) simply does not commit: its entries are overwritten by
the next write. Nothing is concatenated or deep-copied.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of all layers, ``[num_layers, capacity, num_kv_heads, head_dim]`` each.

    Args:
        num_layers, num_kv_heads, head_dim: the decoder's shape.
        capacity: tokens preallocated; the cache grows (doubling) when needed.
        dtype, device: of the stored tensors (those of the model's activations).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (num_layers, max(capacity, 1), num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (called once per forward, before any layer writes)."""
        need = self.length + n
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], new_cap, *old.shape[2:]))
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``[n, Hkv, D]`` after the cached tokens of ``layer``.

        Returns views ``[length + n, Hkv, D]`` of cached plus new keys and values.
        The write is kept only if :meth:`commit` is called with ``n`` afterwards.
        """
        n = k.shape[0]
        end = self.length + n
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def commit(self, n: int) -> None:
        """Keep the ``n`` tokens written by the last forward."""
        self.length += n

    def fork(self, length: int | None = None) -> KVCache:
        """An independent copy of the first ``length`` cached tokens (default: all).

        One copy of the filled prefix; the new cache has the same capacity.
        """
        length = self.length if length is None else length
        if not 0 <= length <= self.length:
            raise ValueError(f"fork length {length} outside 0..{self.length}")
        new = KVCache.__new__(KVCache)
        new.k = torch.empty_like(self.k)
        new.v = torch.empty_like(self.v)
        new.k[:, :length] = self.k[:, :length]
        new.v[:, :length] = self.v[:, :length]
        new.length = length
        return new

    def keys(self, layer: int) -> Tensor:
        """Cached keys of ``layer``, ``[length, Hkv, D]`` (post-rotary)."""
        return self.k[layer, : self.length]

    def values(self, layer: int) -> Tensor:
        """Cached values of ``layer``, ``[length, Hkv, D]``."""
        return self.v[layer, : self.length]
