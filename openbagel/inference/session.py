"""A conversation with the model: the three guidance contexts and their rotary counters.

* **full**: everything said so far.
* **text-free** (for text guidance): the full context as it was before the
  last user text -- or right after the last image, if one came later (the
  reference refreshes it on every image). Kept as a mark into the full
  context and forked only when an image is generated.
* **image-free** (for image guidance): the user texts, the system prompt and
  the assistant answers, but no image segments and no generated reasoning.
  While nothing full-only has been added it *is* the full context, and is
  not computed twice.

Spec section 7 gives the recipes built on these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from openbagel.kv_cache import KVCache
from openbagel.model.bagel import Bagel, SequenceInput
from openbagel.packing import SpecialIds, latent_segment, text_segment, vit_segment

log = logging.getLogger(__name__)

#: Most text tokens prefilled in one forward.
PREFILL_CHUNK = 1024


@dataclass
class Context:
    """One KV cache and its rotary position counter."""

    cache: KVCache
    rope: int = 0

    @staticmethod
    def empty(model: Bagel, capacity: int = 256) -> Context:
        cfg = model.config.llm
        device = model.vae2llm.weight.device
        return Context(KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, model.dtype, device))

    def fork(self, length: int | None = None, rope: int | None = None) -> Context:
        """An independent copy (of the first ``length`` cached tokens, with counter ``rope``)."""
        return Context(self.cache.fork(length), self.rope if rope is None else rope)

    @property
    def device(self) -> torch.device:
        return self.cache.k.device


def append(model: Bagel, ctx: Context, seg: SequenceInput, rope_advance: int) -> Tensor:
    """Run ``seg`` over ``ctx``, keep its keys/values and advance the counter. Returns hidden ``[L, D]``."""
    hidden = model(seg, ctx.cache)
    ctx.cache.commit(seg.length)
    limit = model.config.llm.max_position_embeddings
    if ctx.rope < limit <= ctx.rope + rope_advance:
        log.warning("the context passed %d positions, the length the model was trained for; quality may drop", limit)
    ctx.rope += rope_advance
    return hidden


class Session:
    """The contexts of one conversation, fed with token ids and tensors.

    Higher-level code (:class:`openbagel.pipeline.BagelPipeline`) turns text
    and PIL images into what these methods take.
    """

    def __init__(self, model: Bagel, special: SpecialIds, capacity: int = 256):
        self.model = model
        self.special = special
        self.full = Context.empty(model, capacity)
        self._image_free: Context | None = None  # None: identical to full
        self._mark = (0, 0)  # text-free context: (kv length, rope) in full

    @property
    def image_free_is_full(self) -> bool:
        """True while the image-free context holds exactly what the full context holds."""
        return self._image_free is None

    @property
    def image_free(self) -> Context:
        return self.full if self._image_free is None else self._image_free

    def _diverge(self) -> None:
        if self._image_free is None:
            self._image_free = self.full.fork()

    def _text(self, ctx: Context, ids: list[int]) -> None:
        # Long texts are prefilled in chunks: exact for causal attention, and the
        # attention scores then take O(chunk x context) memory, not O(context^2).
        wrapped = [self.special.bos, *ids, self.special.eos]
        for start in range(0, len(wrapped), PREFILL_CHUNK):
            chunk = wrapped[start : start + PREFILL_CHUNK]
            append(self.model, ctx, text_segment(chunk, ctx.rope, ctx.device), len(chunk))

    def add_text(self, ids: list[int], *, user: bool = True, image_free: bool = True) -> None:
        """Append ``[BOS] ids [EOS]``.

        Args:
            ids: token ids of the text (no specials).
            user: a user text: the text-free context becomes the full context as it is now.
            image_free: also append to the image-free context (False for generated reasoning).
        """
        if user:
            self._mark = (self.full.cache.length, self.full.rope)
        if not image_free:
            self._diverge()
        self._text(self.full, ids)
        if image_free and self._image_free is not None:
            self._text(self._image_free, ids)

    def add_vae_image(self, latent_tokens: Tensor, position_ids: Tensor) -> None:
        """Append a clean VAE image segment ``[h*w, p*p*z]`` (t = 0) to the full context."""
        self._diverge()
        seg = latent_segment(latent_tokens.to(self.full.device), 0.0, position_ids, self.full.rope, self.special)
        append(self.model, self.full, seg, 1)
        self._mark = (self.full.cache.length, self.full.rope)

    def add_vit_image(self, patches: Tensor, position_ids: Tensor) -> None:
        """Append a ViT image segment (``[N, 3*p*p]`` patches) to the full context."""
        self._diverge()
        seg = vit_segment(patches.to(self.full.device), position_ids, self.full.rope, self.special)
        append(self.model, self.full, seg, 1)
        self._mark = (self.full.cache.length, self.full.rope)

    def text_free(self) -> Context:
        """A fork of the text-free context (see the module docstring)."""
        length, rope = self._mark
        return self.full.fork(length, rope)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo everything added inside the block if it raises (an error or
        Ctrl-C mid-way leaves the conversation as it was). Caches only grow,
        so undoing is resetting lengths and counters."""
        full = (self.full.cache.length, self.full.rope)
        free = None if self._image_free is None else (self._image_free.cache.length, self._image_free.rope)
        mark = self._mark
        try:
            yield
        except BaseException:
            self.full.cache.length, self.full.rope = full
            if free is None:
                self._image_free = None
            else:
                self._image_free.cache.length, self._image_free.rope = free
            self._mark = mark
            raise

    def fork(self) -> Session:
        """An independent copy of the whole conversation."""
        new = Session.__new__(Session)
        new.model, new.special, new._mark = self.model, self.special, self._mark
        new.full = self.full.fork()
        new._image_free = None if self._image_free is None else self._image_free.fork()
        return new
