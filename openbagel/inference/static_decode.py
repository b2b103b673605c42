"""Text decoding with static shapes, for ``torch.compile`` and CUDA graphs.

The plain decoding step attends to the ``length + 1`` keys cached so far, so
its shapes change with every token and a compiled step would recompile. Here
every step has the same shapes: the token, its position and its cache slot
are tensors updated in place, the step writes its key and value with
``index_copy_`` and attends over the cache's whole capacity with a mask of
the slots filled so far. The capacity grows by doubling, so a conversation
meets only a few shapes (one compiled graph each).

Same numbers as :func:`~openbagel.inference.generate.decode_tokens` (a test
checks tokens and logits); on a GPU, ``mode="reduce-overhead"`` replays each
step as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from openbagel.inference.sampling import TextSampling, next_token
from openbagel.inference.session import Context
from openbagel.model.attention import AttnMask, attention
from openbagel.model.bagel import Bagel
from openbagel.packing import SpecialIds


class _StaticSlots:
    """The decoder's cache protocol over a fixed-capacity storage (see ``MoTModel.forward``)."""

    def __init__(self, k: list[Tensor], v: list[Tensor], index: Tensor, filled: Tensor):
        self.k, self.v, self.index, self.filled = k, v, index, filled

    def reserve(self, n: int) -> None:
        """The storage was sized before decoding."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
        self.k[layer].index_copy_(0, self.index, k)
        self.v[layer].index_copy_(0, self.index, v)
        return attention(q, self.k[layer], self.v[layer], AttnMask.dense(self.filled))


class StaticDecoder:
    """Decodes like :func:`~openbagel.inference.generate.decode_tokens`, one fixed-shape step per token.

    Args:
        model: the network (its understanding expert runs).
        compile: wrap the step in ``torch.compile(fullgraph=True)``.
        backend, mode: passed to ``torch.compile`` (``mode="reduce-overhead"``
            on a GPU uses CUDA graphs).
    """

    def __init__(self, model: Bagel, compile: bool = False, backend: str = "inductor", mode: str | None = None):
        self.model = model
        self.step = torch.compile(self._step, fullgraph=True, backend=backend, mode=mode) if compile else self._step

    def _step(
        self, ids: Tensor, pos: Tensor, index: Tensor, filled: Tensor, k: list[Tensor], v: list[Tensor]
    ) -> Tensor:
        slots = _StaticSlots(k, v, index, filled)
        hidden = self.model.language_model.model(self.model.embed_text(ids), pos, AttnMask.full(), 1, slots)
        return self.model.logits(hidden)[0]

    def decode(
        self,
        ctx: Context,
        special: SpecialIds,
        params: TextSampling,
        generator: torch.Generator | None = None,
        on_logits: Callable[[Tensor], None] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids from ``ctx`` (which is extended, as with ``decode_tokens``).

        Raises:
            NumericalError: NaN/Inf logits.
        """
        cache, device = ctx.cache, ctx.device
        cache.reserve(params.max_new_tokens)
        start = cache.length
        # slots not filled yet take part in the masked attention: they must hold finite numbers
        for t in cache.k + cache.v:
            t[start:].zero_()
            if device.type == "cuda":  # CUDA graphs may then update the storage in place
                torch._dynamo.mark_static_address(t)
        filled = torch.zeros(1, cache.capacity, dtype=torch.bool, device=device)
        filled[0, :start] = True
        ids = torch.tensor([special.bos], device=device)
        pos = torch.tensor([ctx.rope], device=device)
        index = torch.tensor([start], device=device)
        for i in range(params.max_new_tokens):
            filled[0, start + i] = True
            logits = self.step(ids, pos, index, filled, cache.k, cache.v)
            cache.commit(1)
            ctx.rope += 1
            token = next_token(logits, params, generator, on_logits)
            if token == special.eos:
                return
            ids.fill_(token)
            pos += 1
            index += 1
            yield token
