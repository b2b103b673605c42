"""A preallocated key/value cache for every decoder layer.

Keys are stored after rotary embedding. A forward pass writes the keys and
values of its tokens right after the cached ones (:meth:`KVCache.update`) and
attends over the returned views; whether those tokens stay in the cache is
decided afterwards by :meth:`KVCache.commit`. A query that must not be kept (an
image-generation step) simply does not commit: its entries are overwritten by
the next write. Nothing is concatenated; growing past the capacity reallocates
(doubling, so amortised O(1) per token) and a :class:`CacheBudget` can refuse it.

A context that only extends this one for a while (text decoding) takes a
:meth:`KVCache.share` of it instead of a copy; guidance branches that are a
prefix of a context read its storage directly (see
:mod:`openbagel.inference.denoise`).
"""

from __future__ import annotations

import re
import weakref

import torch
from torch import Tensor

from openbagel.errors import InvalidInputError
from openbagel.model.attention import AttnMask, attention


class CacheBudgetError(InvalidInputError):
    """A context would need more KV-cache memory than its budget allows."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, name: str = "size") -> int:
    """``'2GB'`` -> ``2_000_000_000``; ``'512MiB'``, ``'1.5 GiB'``, ``'1000'`` (bytes) also work.

    Raises:
        InvalidInputError: not a positive size with a known unit (the option ``name`` in the message).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    n = int(float(m.group(1)) * _UNITS[unit]) if m and unit in _UNITS else 0
    if n < 1:
        raise InvalidInputError(f"{name} must be a size such as 2GB, 512MiB or 1000000 (bytes), got {text!r}")
    return n


class CacheBudget:
    """A limit on the KV-cache bytes allocated by the caches that share it (one conversation).

    Args:
        max_bytes: the limit; ``None`` for no limit.
    Attributes:
        allocated: bytes currently allocated by the caches of this budget.
    """

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise InvalidInputError(f"the KV-cache budget must be a positive number of bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.allocated = 0

    #: With a budget, caches grow to what they need rounded up to this many tokens (no doubling).
    STEP = 64

    @staticmethod
    def rounded(tokens: int) -> int:
        """``tokens`` rounded up to a multiple of :attr:`STEP` (at least one step)."""
        return max(CacheBudget.STEP, -(-tokens // CacheBudget.STEP) * CacheBudget.STEP)

    def room(self, freed: int, bytes_per_token: int) -> int | None:
        """Tokens a cache could hold if it freed ``freed`` bytes (None: no limit)."""
        if self.max_bytes is None:
            return None
        return (self.max_bytes - self.allocated + freed) // bytes_per_token

    def check(self, old_bytes: int, new_bytes: int, need: int, bytes_per_token: int) -> None:
        """Whether a cache holding ``old_bytes`` (freed afterwards) may take ``new_bytes`` to hold ``need`` tokens.

        Raises:
            CacheBudgetError: the budget would be exceeded (the message gives what is needed).
        """
        after = self.allocated - old_bytes + new_bytes
        if self.max_bytes is not None and after > self.max_bytes:
            raise CacheBudgetError(
                f"this context would hold {need} token{'s' * (need != 1)} of KV cache "
                f"({format_bytes(need * bytes_per_token)}), bringing "
                f"the conversation to {format_bytes(after)}, over the KV-cache budget of "
                f"{format_bytes(self.max_bytes)}; raise the budget (--kv-cache-budget), or use smaller images, "
                "shorter texts, fewer images per call or a new conversation"
            )

    def track(self, storage: Tensor, nbytes: int) -> None:
        """Count ``nbytes`` until ``storage`` is garbage collected."""
        self.allocated += nbytes
        weakref.finalize(storage, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.allocated -= nbytes


class KVCache:
    """Keys and values of all layers: per layer, ``[capacity, num_kv_heads, head_dim]`` each.

    Each layer's storage lives on the device that layer runs on (layers split
    across devices keep their cache with them).

    Args:
        num_layers, num_kv_heads, head_dim: the decoder's shape.
        capacity: tokens preallocated (none with a budget); the cache grows
            when needed (doubling; with a budget, to what is needed, in steps
            of :attr:`CacheBudget.STEP` tokens).
        dtype: of the stored tensors (that of the model's activations).
        device: where the storages go: one device, or one per layer.
        budget: shared limit on allocated bytes (default: unlimited).
    Raises:
        CacheBudgetError: the initial capacity exceeds the budget.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | list[torch.device] = "cpu",
        budget: CacheBudget | None = None,
    ):
        self.budget = budget or CacheBudget()
        devices = device if isinstance(device, (list, tuple)) else [device] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} devices for {num_layers} layers")
        self.k = [torch.empty(0, num_kv_heads, head_dim, dtype=dtype, device=d) for d in devices]
        self.v = [t.new_empty(t.shape) for t in self.k]
        self.length = 0
        self._parent: KVCache | None = None  # set by share()
        self._parent_length = 0
        if self.budget.max_bytes is not None:  # a budgeted cache takes memory when it needs it, in small steps
            capacity = 0
        self._allocate(capacity, copy=0, need=0)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def device(self) -> torch.device:
        """The first layer's device (where the model's inputs go)."""
        return self.k[0].device

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0]

    @property
    def bytes_per_token(self) -> int:
        """Key plus value bytes of one token over all layers."""
        _, h, d = self.k[0].shape
        return 2 * self.num_layers * h * d * self.k[0].element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self.bytes_per_token * self.capacity

    def _freed_by_growing(self) -> int:
        # a shared child's storage belongs to its parent and is not freed by growing
        return self.nbytes if self._parent is None else 0

    def _allocate(self, cap: int, copy: int, need: int) -> None:
        per_token = self.bytes_per_token
        self.budget.check(self._freed_by_growing(), per_token * cap, need, per_token)
        k = [t.new_empty((cap, *t.shape[1:])) for t in self.k]
        v = [t.new_empty((cap, *t.shape[1:])) for t in self.v]
        self.budget.track(k[0], per_token * cap)  # the layers' storages live and die together
        if copy:
            for new, old in zip(k + v, self.k + self.v):
                new[:copy] = old[:copy]
        self.k, self.v = k, v
        self._parent = None  # own storage from now on

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (called once per forward, before any layer writes).

        Raises:
            CacheBudgetError: the budget cannot hold ``length + n`` tokens; nothing changed.
        """
        self._check_parent()
        need = self.length + n
        if need <= self.capacity:
            return
        room = self.budget.room(self._freed_by_growing(), self.bytes_per_token)
        if room is None:
            new_cap = max(need, 2 * self.capacity)  # amortised O(1) per token
        else:  # what is needed, a little more if it fits
            new_cap = max(need, min(CacheBudget.rounded(need), room))
        self._allocate(new_cap, copy=self.length, need=need)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``[n, Hkv, D]`` after the cached tokens of ``layer``.

        Returns views ``[length + n, Hkv, D]`` of cached plus new keys and values.
        The write is kept only if :meth:`commit` is called with ``n`` afterwards.
        """
        n = k.shape[0]
        end = self.length + n
        self.k[layer][self.length : end] = k
        self.v[layer][self.length : end] = v
        return self.k[layer][:end], self.v[layer][:end]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
        """Attention of ``q`` ``[n, H, D]`` over the cached tokens plus the new ``k``, ``v`` (written, not committed)."""
        keys, values = self.update(layer, k, v)
        return attention(q, keys, values, mask)

    def commit(self, n: int) -> None:
        """Keep the ``n`` tokens written by the last forward."""
        self.length += n

    def fork(self, length: int | None = None, device: torch.device | str | None = None) -> KVCache:
        """An independent copy of the first ``length`` cached tokens (default: all).

        One copy of the filled prefix; the new cache has room for it (and grows
        when appended to) and shares the budget. With ``device``, the copy
        lives there (every layer's storage).
        """
        length = self.length if length is None else length
        if not 0 <= length <= self.length:
            raise ValueError(f"fork length {length} outside 0..{self.length}")
        new = KVCache.__new__(KVCache)
        new.budget, new.length, new._parent, new._parent_length = self.budget, length, None, 0
        new.k = [t.new_empty((0, *t.shape[1:]), device=device or t.device) for t in self.k]
        new.v = [t.new_empty((0, *t.shape[1:]), device=device or t.device) for t in self.v]
        new._allocate(CacheBudget.rounded(length), copy=0, need=length)
        for dst, src in zip(new.k + new.v, self.k + self.v):
            dst[:length] = src[:length]
        return new

    def share(self) -> KVCache:
        """A cache that extends this one without copying it: same storage, its own length.

        The child writes after this cache's tokens, so this cache must not grow
        while the child is in use (a child that needs more room than the
        capacity moves to storage of its own). Reserve room on this cache first.

        Raises (later, from the child):
            RuntimeError: this cache was changed while the child was in use.
        """
        new = KVCache.__new__(KVCache)
        new.budget, new.k, new.v, new.length = self.budget, self.k, self.v, self.length
        new._parent, new._parent_length = self, self.length
        return new

    def _check_parent(self) -> None:
        p = self._parent
        if p is not None and (p.length != self._parent_length or p.k is not self.k):
            raise RuntimeError(
                "the conversation changed while a reply was being decoded from it; finish (or close) the reply first"
            )

    def keys(self, layer: int) -> Tensor:
        """Cached keys of ``layer``, ``[length, Hkv, D]`` (post-rotary)."""
        return self.k[layer][: self.length]

    def values(self, layer: int) -> Tensor:
        """Cached values of ``layer``, ``[length, Hkv, D]``."""
        return self.v[layer][: self.length]
