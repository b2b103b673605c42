"""A conversation with the model: the three guidance contexts and their rotary counters.

* **full**: everything said so far.
* **text-free** (for text guidance): the full context as it was before the
  last user text -- or right after the last image, if one came later (the
  reference refreshes it on every image). Kept as a mark into the full
  context and forked only when an image is generated.
* **image-free** (for image guidance): the user texts, the system prompt and
  the assistant answers, but no image segments and no generated reasoning.
  While nothing full-only has been added it *is* the full context, and is
  not computed twice. Once they differ, the session keeps a record of the
  texts it holds and builds it only when an image is generated from it
  (:meth:`Session.branch`): understanding never reads it, so a question
  after an image costs no second copy of its keys and values.

Spec section 7 gives the recipes built on these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from openbagel.inference.denoise import Branch
from openbagel.kv_cache import CacheBudget, KVCache
from openbagel.model.bagel import Bagel, SequenceInput
from openbagel.packing import SpecialIds, latent_segment, text_segment, vit_segment
from openbagel.placement import layer_devices

log = logging.getLogger(__name__)

#: Most text tokens prefilled in one forward.
PREFILL_CHUNK = 1024

#: The guidance contexts, as :meth:`Session.branch` names them.
FULL, TEXT_FREE, IMAGE_FREE = "full", "text_free", "image_free"


@dataclass
class Context:
    """One KV cache and its rotary position counter."""

    cache: KVCache
    rope: int = 0

    @staticmethod
    def empty(model: Bagel, capacity: int = 256, budget: CacheBudget | None = None) -> Context:
        cfg = model.config.llm
        devices = layer_devices(model)  # each layer's keys where that layer runs
        return Context(KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, capacity, model.dtype, devices, budget))

    def fork(self, length: int | None = None, rope: int | None = None) -> Context:
        """An independent copy (of the first ``length`` cached tokens, with counter ``rope``)."""
        return Context(self.cache.fork(length), self.rope if rope is None else rope)

    @property
    def device(self) -> torch.device:
        return self.cache.device


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

    Args:
        capacity: tokens preallocated for the full context.
        max_cache_bytes: KV-cache budget of the whole conversation (every
            context, fork and query scratch); ``None``: unlimited.
    Raises:
        CacheBudgetError: (from any method that adds tokens) the context would
            exceed the budget; the conversation is left as it was.
    """

    def __init__(self, model: Bagel, special: SpecialIds, capacity: int = 256, max_cache_bytes: int | None = None):
        self.model = model
        self.special = special
        self.budget = CacheBudget(max_cache_bytes)
        self.full = Context.empty(model, capacity, self.budget)
        self._mark = (0, 0)  # text-free context: (kv length, rope) in full
        # The image-free context, once it differs from the full one: the full
        # context's (kv length, rope) when they parted (its shared prefix),
        # then the texts added since. ``_image_free`` is built from that record
        # on demand and holds its first ``_free_built`` texts.
        self._free_prefix: tuple[int, int] | None = None  # None: identical to full
        self._free_texts: list[list[int]] = []
        self._image_free: Context | None = None
        self._free_built = 0

    @property
    def image_free_is_full(self) -> bool:
        """True while the image-free context holds exactly what the full context holds."""
        return self._free_prefix is None

    @property
    def image_free(self) -> Context:
        """The image-free context, built now from the conversation's record if needed (model forwards)."""
        if self._free_prefix is None:
            return self.full
        if self._image_free is None:
            length, rope = self._free_prefix
            # the full context's first ``length`` tokens never change once written
            if length:
                self._image_free = self.full.fork(length, rope)
            else:
                self._image_free = Context.empty(self.model, budget=self.budget)
                self._image_free.rope = rope
            self._free_built = 0
        ctx = self._image_free
        for ids in self._free_texts[self._free_built :]:
            before = (ctx.cache.length, ctx.rope)
            try:
                self._text(ctx, ids)
            except BaseException:  # e.g. no budget left: keep the record and the context consistent
                ctx.cache.length, ctx.rope = before
                raise
            self._free_built += 1
        return ctx

    def _diverge(self) -> None:
        # The image-free context starts as the full one; from here on they differ.
        if self._free_prefix is None:
            self._free_prefix = (self.full.cache.length, self.full.rope)

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
            image_free: also part of the image-free context (False for generated
                reasoning); once that context differs from the full one, the text
                is recorded for it and computed only when an image needs it.
        """
        if user:
            self._mark = (self.full.cache.length, self.full.rope)
        if not image_free:
            self._diverge()
        self._text(self.full, ids)
        if image_free and self._free_prefix is not None:
            self._free_texts.append(list(ids))

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
        """A copy of the text-free context (see the module docstring).

        Generation does not copy it (it reads the full context's prefix, see
        :meth:`branch`); this is for the plain path and for tests.
        """
        length, rope = self._mark
        return self.full.fork(length, rope)

    def branch(self, kind: str) -> Branch:
        """Where a guidance context lives, without copying it: ``FULL``, ``TEXT_FREE`` or ``IMAGE_FREE``.

        ``IMAGE_FREE`` first builds that context from the record if needed
        (model forwards; CacheBudgetError if the budget cannot hold it).
        """
        if kind == TEXT_FREE:
            return Branch(self.full.cache, *self._mark)
        ctx = self.full if kind == FULL else self.image_free
        return Branch(ctx.cache, ctx.cache.length, ctx.rope)

    def decoding_context(self, max_new_tokens: int) -> Context:
        """A context to decode a reply in, extending the full one without copying it.

        Room for ``max_new_tokens`` (plus the end token) is reserved in the
        full context's storage; the decoded tokens are not part of the
        conversation (add them with :meth:`add_text`). Do not add to the
        conversation until decoding is over.
        """
        self.full.cache.reserve(max_new_tokens + 1)
        return Context(self.full.cache.share(), self.full.rope)

    @property
    def cache_bytes(self) -> int:
        """KV-cache bytes allocated by this conversation now (all contexts, forks and scratch alive)."""
        return self.budget.allocated

    @property
    def cached_tokens(self) -> int:
        """Tokens held by the full context and the image-free one as built so far (once each when they are the same)."""
        n = self.full.cache.length
        return n if self._image_free is None else n + self._image_free.cache.length

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo everything added inside the block if it raises (an error or
        Ctrl-C mid-way leaves the conversation as it was). Caches only grow,
        so undoing is resetting lengths, counters and the image-free record."""
        full = (self.full.cache.length, self.full.rope)
        record = (self._mark, self._free_prefix, len(self._free_texts), self._image_free, self._free_built)
        built = None if self._image_free is None else (self._image_free.cache.length, self._image_free.rope)
        try:
            yield
        except BaseException:
            self.full.cache.length, self.full.rope = full
            self._mark, self._free_prefix, n_texts, self._image_free, self._free_built = record
            del self._free_texts[n_texts:]
            if built is not None:
                self._image_free.cache.length, self._image_free.rope = built
            raise

    def fork(self) -> Session:
        """An independent copy of the whole conversation."""
        new = Session.__new__(Session)
        new.model, new.special, new.budget, new._mark = self.model, self.special, self.budget, self._mark
        new.full = self.full.fork()
        new._free_prefix, new._free_texts, new._free_built = self._free_prefix, list(self._free_texts), self._free_built
        new._image_free = None if self._image_free is None else self._image_free.fork()
        return new
