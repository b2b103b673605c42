"""One forward for every guidance branch (and every sample) of a denoising step.

A denoising step asks the model for the velocity of the same noisy latents
under up to three contexts (full, text-free, image-free; spec section 6), and
a batch of requests multiplies that. The reference runs one forward per
branch, each over a context it first copies. Here the queries of all branches
are packed into one sequence and run as one forward:

* the token-wise work (projections, MLPs, norms) runs once over all of them,
  and with the two image markers of every branch first and every latent block
  last, each expert sees one contiguous slice (no scatter);
* each branch attends to its own context **in place**: the text-free context
  is a prefix of the full one and reads the full context's storage (no fork);
  the queries' keys and values are written after the stored tokens, and a
  mask built once per generation hides what a branch must not see where its
  span of the storage holds such tokens.

Nothing here is kept in a cache: the queries are never committed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from openbagel.kv_cache import KVCache
from openbagel.model.attention import AttnMask, attention
from openbagel.model.bagel import Bagel, SequenceInput
from openbagel.packing import SpecialIds


@dataclass(frozen=True)
class Branch:
    """A context to condition on: the first ``length`` tokens of ``cache``, next rotary position ``rope``."""

    cache: KVCache
    length: int
    rope: int


@dataclass
class _Slot:
    """Where one branch's query keys go and which stored tokens it sees."""

    cache: KVCache
    offset: int  # first row of the branch's query keys in the storage
    end: int  # the branch attends to keys [0, end) ...
    mask: Tensor | None  # ... all of them (None), or those where this bool [n + 2, end] is True


class BatchedQuery:
    """The packed query of ``B`` branches over the same ``n`` latent positions.

    Build once per generation (and per set of active branches); call
    :meth:`velocities` at every step. Packed order: the ``2B`` image markers
    (branch by branch), then the ``B`` latent blocks; every branch's tokens sit
    at its context's rotary position with full attention among themselves.

    In each storage the branches' query keys are written after the stored
    tokens, longest context first. A branch then attends to one contiguous
    span of the storage, masked only where that span holds tokens it must not
    see (the tokens a text-free context lacks, an earlier branch's queries).
    In text to image every span is exact and nothing is masked.

    Args:
        model: the network.
        branches: the contexts, one per query.
        position_ids: ``[n]`` latent position ids of the image being generated.
        special: marker token ids.
    Raises:
        CacheBudgetError: a storage has no room (within its budget) for the queries' keys.
    """

    def __init__(self, model: Bagel, branches: list[Branch], position_ids: Tensor, special: SpecialIds):
        self.model = model
        self.num_branches = b = len(branches)
        self.n = n = position_ids.shape[0]
        device = branches[0].cache.device
        ropes = torch.tensor([br.rope for br in branches], dtype=torch.long, device=device)
        owner = torch.arange(b, device=device)
        owner = torch.cat([owner.repeat_interleave(2), owner.repeat_interleave(n)])
        self.seg = SequenceInput(
            positions=ropes[owner],
            mask=AttnMask.full(),
            num_und=2 * b,
            text_ids=torch.tensor([special.start_of_image, special.end_of_image], device=device).repeat(b),
            text_indexes=torch.arange(2 * b, device=device),
            latent_position_ids=position_ids.to(device).repeat(b),
            latent_indexes=torch.arange(2 * b, 2 * b + b * n, device=device),
        )
        storages: dict[int, list[int]] = {}
        for i, br in enumerate(branches):
            storages.setdefault(id(br.cache), []).append(i)
        self.slots: list[_Slot | None] = [None] * b
        for members in storages.values():
            cache = branches[members[0]].cache
            cache.reserve(len(members) * (n + 2))
            start = cache.length
            for k, i in enumerate(sorted(members, key=lambda i: -branches[i].length)):
                offset = start + k * (n + 2)
                end = offset + n + 2
                mask = None
                if branches[i].length < offset:  # a hole between its context and its queries
                    keys = torch.arange(end, device=device)
                    seen = (keys < branches[i].length) | (keys >= offset)
                    mask = seen.expand(n + 2, end)
                self.slots[i] = _Slot(cache, offset, end, mask)

    # the cache protocol of the decoder (see MoTModel.forward)
    def reserve(self, n: int) -> None:
        """Room was reserved when the query was built."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
        """Each branch's queries over its context and its own queries' keys, in place in its storage."""
        b, n = self.num_branches, self.n
        rows = [(slice(2 * i, 2 * i + 2), slice(2 * b + i * n, 2 * b + (i + 1) * n)) for i in range(b)]
        # every branch's keys are written before any branch attends: the hidden
        # part of a span must hold finite numbers (0 x NaN is NaN)
        for slot, (marks, lat) in zip(self.slots, rows):
            o = slot.offset
            for store, new in ((slot.cache.k[layer], k), (slot.cache.v[layer], v)):
                store[o : o + 2] = new[marks]
                store[o + 2 : o + 2 + n] = new[lat]
        out = q.new_empty(q.shape)
        for slot, (marks, lat) in zip(self.slots, rows):
            qi = torch.cat([q[marks], q[lat]])
            keys, values = slot.cache.k[layer][: slot.end], slot.cache.v[layer][: slot.end]
            mask = AttnMask.full() if slot.mask is None else AttnMask.dense(slot.mask.to(keys.device))
            oi = attention(qi, keys, values, mask)
            out[marks], out[lat] = oi[:2], oi[2:]
        return out

    def velocities(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocities ``[B, n, C]`` (float32) of the noisy latents ``x`` ``[B, n, C]`` at flow time ``t`` (scalar)."""
        b, n, c = x.shape
        seg = replace(
            self.seg,
            latents=x.reshape(b * n, c).to(self.seg.positions.device),
            latent_timesteps=t.reshape(1).float(),  # one time for every latent token
        )
        hidden = self.model(seg, self)
        return self.model.velocity(hidden[2 * b :]).view(b, n, c)


class ParallelQuery:
    """The branches of a :class:`BatchedQuery` spread over whole copies of the model on several devices.

    Branch ``i`` runs on copy ``i mod D``; each copy but the first gets its
    branches' contexts copied to its device once, when the query is built (the
    contexts do not change while an image is denoised), and at every step the
    copies run side by side (one thread each; on GPUs the kernels overlap),
    their velocities gathered on the first device. Same numbers as one
    :class:`BatchedQuery` up to float rounding (other batch shapes).

    Args:
        replicas: the model and its copies (:func:`~openbagel.placement.replicate_for_branches`).
        branches, position_ids, special: as :class:`BatchedQuery`.
    """

    def __init__(self, replicas: list[Bagel], branches: list[Branch], position_ids: Tensor, special: SpecialIds):
        self.parts: list[tuple[list[int], BatchedQuery]] = []
        for r, model in enumerate(replicas):
            idx = list(range(r, len(branches), len(replicas)))
            if not idx:
                continue
            device = model.vae2llm.weight.device
            # the first copy reads the contexts in place; the others get copies of them (on
            # their device; their query keys must not land in the storage the first one writes to)
            moved = [
                br if r == 0 else Branch(br.cache.fork(br.length, device), br.length, br.rope)
                for br in (branches[i] for i in idx)
            ]
            self.parts.append((idx, BatchedQuery(model, moved, position_ids.to(device), special)))

    def velocities(self, x: Tensor, t: Tensor) -> Tensor:
        """As :meth:`BatchedQuery.velocities`: ``[B, n, C]`` float32 on ``x``'s device."""
        results: list[Tensor | BaseException | None] = [None] * len(self.parts)
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # per thread in torch

        def run(k: int) -> None:
            idx, query = self.parts[k]
            device = query.seg.positions.device
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    results[k] = query.velocities(x[idx].to(device), t.to(device)).to(x.device)
            except BaseException as e:  # raised again in the caller's thread
                results[k] = e

        threads = [threading.Thread(target=run, args=(k,)) for k in range(1, len(self.parts))]
        for th in threads:
            th.start()
        run(0)
        for th in threads:
            th.join()
        out = x.new_empty(x.shape)
        for (idx, _), res in zip(self.parts, results):
            if isinstance(res, BaseException):
                raise res
            out[idx] = res
        return out
