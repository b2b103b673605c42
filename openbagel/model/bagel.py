"""The whole BAGEL network: embeddings in, hidden states out; heads for logits
and flow velocities. Pure: no tokenizer, images, noise or losses here.

Module names follow the published ``ema.safetensors`` one to one
(``language_model.*``, ``vit_model.*``, ``connector.*``, ``time_embedder.*``,
``vae2llm``, ``llm2vae``, ``latent_pos_embed``, ``vit_pos_embed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openbagel.config import BagelConfig
from openbagel.model.attention import AttnMask
from openbagel.model.layers import PositionTable, TimestepEmbedder
from openbagel.model.llm import MoTForCausalLM
from openbagel.model.vit import SiglipVisionModel

if TYPE_CHECKING:
    from openbagel.kv_cache import KVCache


@dataclass
class SequenceInput:
    """One packed sequence of tokens for :meth:`Bagel.forward`.

    The ``L`` tokens are ordered **understanding first** (text, ViT tokens,
    image markers: the first ``num_und``), **generation last** (VAE latent
    tokens). Each kind of token names the sequence slots it fills
    (``*_indexes``); together they must cover ``0..L-1`` exactly once.

    Attributes:
        positions: ``[L]`` int64 rotary positions.
        mask: attention mask of the ``L`` queries (over cached + new keys).
        num_und: number of understanding tokens.
        text_ids, text_indexes: ``[n_text]`` int64 token ids and their slots.
        vit_patches: ``[n_vit, 3*14*14]`` float patches in ``(row, col, channel)`` order.
        vit_position_ids: ``[n_vit]`` flattened ViT position ids.
        vit_seq_lens: patch count of each packed image (sums to ``n_vit``).
        vit_indexes: ``[n_vit]`` slots of the ViT tokens.
        latents: ``[n_lat, p*p*z]`` latent patches (noisy or clean).
        latent_timesteps: ``[n_lat]`` flow time of each latent token (0 = clean),
            or ``[1]``: one time for all of them (embedded once).
        latent_position_ids: ``[n_lat]`` flattened latent position ids.
        latent_indexes: ``[n_lat]`` slots of the latent tokens (all ``>= num_und``).
    """

    positions: Tensor
    mask: AttnMask
    num_und: int
    text_ids: Tensor | None = None
    text_indexes: Tensor | None = None
    vit_patches: Tensor | None = None
    vit_position_ids: Tensor | None = None
    vit_seq_lens: list[int] | None = None
    vit_indexes: Tensor | None = None
    latents: Tensor | None = None
    latent_timesteps: Tensor | None = None
    latent_position_ids: Tensor | None = None
    latent_indexes: Tensor | None = None

    @property
    def length(self) -> int:
        return self.positions.shape[0]


class Connector(nn.Module):
    """ViT hidden -> LLM hidden: ``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, vit_hidden: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Bagel(nn.Module):
    """BAGEL without its VAE (that is :class:`~openbagel.model.vae.BagelVAE`).

    Build with ``Bagel(config)``; load weights with :func:`openbagel.checkpoint.load_model`.
    """

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.config = config
        d = config.llm.hidden_size
        self.language_model = MoTForCausalLM(config.llm)
        self.vit_model = SiglipVisionModel(config.vit)
        self.connector = Connector(config.vit.hidden_size, d)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(config.latent_channels_per_token, d)
        self.llm2vae = nn.Linear(d, config.latent_channels_per_token)
        self.latent_pos_embed = PositionTable(config.max_latent_size, d)
        self.vit_pos_embed = PositionTable(config.vit_max_num_patch_per_side, d)

    # --- parts ---------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_text(self, ids: Tensor) -> Tensor:
        """``[n]`` token ids -> ``[n, D]`` word embeddings."""
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: Tensor, position_ids: Tensor, seq_lens: list[int]) -> Tensor:
        """ViT token embeddings ``connector(vit(patches)) + vit_pos_table[position_ids]``, ``[n, D]``."""
        h = self.vit_model(patches.to(self.dtype), position_ids, seq_lens)
        return self.connector(h) + self.vit_pos_embed(position_ids).to(self.dtype)

    def embed_latents(self, latents: Tensor, timesteps: Tensor, position_ids: Tensor) -> Tensor:
        """Latent token embeddings ``vae2llm(x) + time_embed(t) + latent_pos_table[pos]``, ``[n, D]``."""
        return (
            self.vae2llm(latents.to(self.dtype))
            + self.time_embedder(timesteps)
            + self.latent_pos_embed(position_ids).to(self.dtype)
        )

    def embed(self, inp: SequenceInput) -> Tensor:
        """The ``[L, D]`` input embeddings of a packed sequence."""
        x = torch.empty(inp.length, self.config.llm.hidden_size, dtype=self.dtype, device=inp.positions.device)
        filled = 0
        if inp.text_ids is not None and inp.text_ids.numel():
            x[inp.text_indexes] = self.embed_text(inp.text_ids)
            filled += inp.text_ids.numel()
        if inp.vit_patches is not None and inp.vit_patches.shape[0]:
            x[inp.vit_indexes] = self.embed_vit(inp.vit_patches, inp.vit_position_ids, inp.vit_seq_lens)
            filled += inp.vit_patches.shape[0]
        if inp.latents is not None and inp.latents.shape[0]:
            x[inp.latent_indexes] = self.embed_latents(inp.latents, inp.latent_timesteps, inp.latent_position_ids)
            filled += inp.latents.shape[0]
        if filled != inp.length:
            raise ValueError(f"packed sequence has {inp.length} slots but {filled} tokens")
        return x

    # --- the forward ------------------------------------------------------------

    def forward(self, inp: SequenceInput, cache: KVCache | None = None) -> Tensor:
        """Hidden states ``[L, D]`` of a packed sequence (after the final norms).

        With a ``cache``, the sequence attends to the cached tokens first and
        its keys/values are written after them; call ``cache.commit(L)`` to keep them.
        """
        return self.language_model.model(self.embed(inp), inp.positions, inp.mask, inp.num_und, cache)

    def decode_step(self, ids: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """Hidden states ``[n, D]`` of ``n`` text tokens after the cache (one decoded token: ``n = 1``).

        The decoding fast path: no packed segment is built (and a single
        causal query needs no mask, see :func:`~openbagel.model.attention.attention`);
        the caller commits.

        Args:
            ids: ``[n]`` int64 token ids. positions: ``[n]`` int64 rotary positions.
        """
        return self.language_model.model(self.embed_text(ids), positions, AttnMask.causal(), ids.shape[0], cache)

    @torch.no_grad()
    def use_decoding_layout(self) -> None:
        """Store the LM head's weight column-major: the same values and shape, another memory order.

        Decoding multiplies one hidden state by this ``[vocab, D]`` matrix, the
        largest read of every token; on CPUs the BLAS matrix-vector product
        reads the column-major order at about twice the speed (measured on
        the real 152k vocabulary; ``benchmarks/RESULTS.md``). Batched products
        are as fast either way. Call after loading; the state dict then holds a
        non-contiguous tensor (``.contiguous()`` it before saving).
        """
        head = self.language_model.lm_head
        if not head.weight.dtype.is_floating_point or type(head.weight.data) is not Tensor:
            return  # a quantized head keeps its packed layout
        head.weight.data = head.weight.data.t().contiguous().t()

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n, D]`` understanding hidden states -> ``[n, vocab]`` float32 logits."""
        return self.language_model.lm_head(hidden).float()

    def velocity(self, hidden: Tensor) -> Tensor:
        """``[n, D]`` generation hidden states -> ``[n, p*p*z]`` float32 flow velocities."""
        return self.llm2vae(hidden).float()

    def reset_position_tables(self) -> None:
        """Rebuild the fixed sin-cos tables (after building on the meta device)."""
        for table in (self.latent_pos_embed, self.vit_pos_embed):
            fresh = PositionTable(table.max_side, self.config.llm.hidden_size).pos_embed
            table.pos_embed = fresh.to(device=self.vae2llm.weight.device)
