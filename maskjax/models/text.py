"""BERT-style bidirectional text encoder built from the same layers, sharding names and scan as the ViT.

Token embedding (tied with the output projection), learned or rotary positions, pre-norm (final
LayerNorm) or post-norm (BERT: LayerNorm on the embeddings, none at the end) blocks, attention
limited to the token's own segment for packed sequences, and BERT's prediction head
(dense + GELU + LayerNorm, then the tied embedding and an output bias).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import sharding
from maskjax.models import layers

POSITIONS = ("learned", "rotary")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, length] segment ids -> [batch, 1, length, length] bool: a token attends only to tokens
    of its own segment (padding, segment 0, attends to padding, so no row is empty)."""
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


class TextEncoder(nnx.Module):
    """tokens, segment_ids, positions [B, L] -> hidden [B, L, width]; :meth:`logits` maps hidden
    states [..., width] to vocabulary logits [..., vocab] (float32)."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, positions: str = "learned", pre_norm: bool = True,
                 dtype: str = "float32", remat: str = "none", lm_head: bool = True, qkv_bias: bool = False,
                 norm_eps: float = 1e-6, attention: str = "auto", rngs: nnx.Rngs):
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} must be one of {POSITIONS}")
        self.dtype = layers.compute_dtype(dtype)
        self.width, self.heads = width, heads
        self.positions, self.pre_norm = positions, pre_norm
        init = nnx.initializers.normal(0.02)
        self.token_embed = layers.param(rngs, init, (vocab_size, width), ("vocab", "embed"), "embedding")
        self.pos_embed = (layers.param(rngs, init, (max_len, width), (None, "embed"), "position")
                          if positions == "learned" else None)
        norm = lambda: layers.LayerNorm(width, rngs=rngs, dtype=self.dtype, eps=norm_eps)
        self.embed_norm = None if pre_norm else norm()
        self.blocks = layers.Stack(depth, width, heads, int(width * mlp_ratio), rngs=rngs, dtype=self.dtype,
                                   pre_norm=pre_norm, remat=remat, qkv_bias=qkv_bias, norm_eps=norm_eps,
                                   attention=attention)
        self.final_norm = norm() if pre_norm else None
        if lm_head:  # BERT's prediction head; a contrastive text tower (FLIP) has none
            self.head_dense = layers.Dense(width, width, ("embed", "embed"), rngs=rngs, dtype=self.dtype)
            self.head_norm = norm()
            self.output_bias = layers.param(rngs, layers.zeros, (vocab_size,), ("vocab",), "bias")

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.token_embed[...], tokens, axis=0)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        x = x.astype(self.dtype)
        return self.embed_norm(x) if self.embed_norm is not None else x

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        x = sharding.constrain(self.embed(tokens, positions), ("batch", "act_length", "act_embed"))
        rope = layers.rotary_tables(positions, self.width // self.heads) if self.positions == "rotary" else None
        x = self.blocks(x, segment_mask(segment_ids), rope)
        return self.final_norm(x) if self.final_norm is not None else x

    def logits(self, hidden: jax.Array) -> jax.Array:
        h = self.head_norm(jax.nn.gelu(self.head_dense(hidden), approximate=False))
        out = jnp.einsum("...d,vd->...v", h, self.token_embed[...].astype(self.dtype))
        return out.astype(jnp.float32) + self.output_bias[...]


def flops(batch: int, length: int, width: int, depth: int, mlp_dim: int, vocab: int, predicted: int) -> int:
    """Forward FLOPs: blocks on all ``length`` tokens + the head at ``predicted`` positions per row."""
    head = 2 * batch * predicted * (width * width + width * vocab)
    return layers.transformer_flops(batch, length, width, depth, mlp_dim) + head
