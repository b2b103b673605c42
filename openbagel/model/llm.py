"""Qwen2 decoder with Mixture-of-Transformer-Experts (MoT).

Every layer holds two full copies of its projections, q/k norms, MLP and
layer norms: the understanding expert (module names as in Qwen2) and the
generation expert (the same names with ``_moe_gen``). Both experts share one
self-attention over the whole sequence. Tokens arrive ordered understanding
first, generation last (see :func:`~openbagel.model.layers.by_expert`).

One forward serves training and inference: the KV cache is an optional
argument. The residual stream between sublayers is kept in float32 whatever
the weights' dtype (bfloat16 weights and matmuls, float32 sums): with it the
greedy tokens of the golden cases survive bfloat16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from openbagel.config import LLMConfig
from openbagel.model.attention import AttnMask, attention
from openbagel.model.layers import RMSNorm, SwiGLU, apply_rope, by_expert, rope_cos_sin

if TYPE_CHECKING:
    from openbagel.kv_cache import KVCache


class MoTAttention(nn.Module):
    """Shared self-attention with per-expert q/k/v/o projections and q/k RMSNorm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, cfg.num_heads * hd, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, cfg.num_kv_heads * hd, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, cfg.num_kv_heads * hd, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(cfg.num_heads * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))

    def forward(
        self,
        x: Tensor,
        num_und: int,
        rope: tuple[Tensor, Tensor],
        mask: AttnMask,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        n = x.shape[0]
        q = by_expert(x, num_und, self.q_proj, self.q_proj_moe_gen).view(n, self.num_heads, self.head_dim)
        k = by_expert(x, num_und, self.k_proj, self.k_proj_moe_gen).view(n, self.num_kv_heads, self.head_dim)
        v = by_expert(x, num_und, self.v_proj, self.v_proj_moe_gen).view(n, self.num_kv_heads, self.head_dim)
        q = by_expert(q, num_und, self.q_norm, self.q_norm_moe_gen)
        k = by_expert(k, num_und, self.k_norm, self.k_norm_moe_gen)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, mask) if cache is None else cache.attend(layer, q, k, v, mask)
        out = out.reshape(n, self.num_heads * self.head_dim)
        return by_expert(out, num_und, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, per expert."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(d, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(d, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_moe_gen = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps)

    def forward(self, x, num_und, rope, mask, cache, layer) -> Tensor:
        h = by_expert(x, num_und, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, num_und, rope, mask, cache, layer)
        h = by_expert(x, num_und, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + by_expert(h, num_und, self.mlp, self.mlp_moe_gen)


class MoTModel(nn.Module):
    """Embeddings, decoder layers, and the per-expert final norms."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: AttnMask,
        num_und: int,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Run the decoder over one packed sequence.

        Args:
            x: ``[L, D]`` input embeddings, understanding tokens first.
            positions: ``[L]`` int64 rotary positions.
            mask: how the ``L`` queries see the keys (cached ones first).
            num_und: number of understanding tokens at the front of ``x``.
            cache: optional KV cache; the new keys/values are written after the
                cached ones and attended to, but kept only if the caller then
                calls ``cache.commit(L)``. Anything with ``reserve(n)`` and
                ``attend(layer, q, k, v, mask)`` serves (a batched guidance
                query, :class:`~openbagel.inference.denoise.BatchedQuery`).
        Returns:
            ``[L, D]`` final hidden states, after each expert's final norm, in the weights' dtype.
        """
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.norm.weight.dtype)
        x = x.float()  # float32 residual stream
        if cache is not None:
            cache.reserve(x.shape[0])
        for i, layer in enumerate(self.layers):
            x = layer(x, num_und, rope, mask, cache, i)
        return by_expert(x, num_und, self.norm, self.norm_moe_gen)


class MoTForCausalLM(nn.Module):
    """The decoder plus the (untied) language-model head: ``language_model`` in the checkpoint."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
