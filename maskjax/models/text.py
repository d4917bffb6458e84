"""BERT-style bidirectional text encoder built from the same layers, sharding names and scan as the ViT.

Token embedding (tied with the output projection), learned or rotary positions, pre-norm (final
LayerNorm) or post-norm (BERT: LayerNorm on the embeddings, none at the end) blocks, attention
limited to the token's own segment for packed sequences, and BERT's prediction head
(dense + GELU + LayerNorm, then the tied embedding and an output bias). Embeddings narrower than the
blocks are projected up (ELECTRA's ``embedding_size``), and one encoder can use another's embedding
tables and their LayerNorm (ELECTRA's generator ties them to the discriminator's).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import sharding
from maskjax.models import layers

POSITIONS = ("learned", "rotary")


def segment_mask(segment_ids: jax.Array, causal: bool = False) -> jax.Array:
    """[batch, length] segment ids -> [batch, 1, length, length] bool: a token attends only to tokens
    of its own segment (padding, segment 0, attends to padding, so no row is empty) and, when
    ``causal``, only to itself and the tokens before it."""
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        length = segment_ids.shape[-1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))
    return mask


class TextEncoder(nnx.Module):
    """tokens, segment_ids, positions [B, L] -> hidden [B, L, width]; :meth:`logits` maps hidden
    states [..., width] to vocabulary logits [..., vocab] (float32)."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, positions: str = "learned", pre_norm: bool = True,
                 dtype: str = "float32", remat: str = "none", lm_head: bool = True, qkv_bias: bool = False,
                 norm_eps: float = 1e-6, attention: str = "auto", embed_dim: int = 0,
                 tie_to: "TextEncoder | None" = None, rngs: nnx.Rngs):
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} must be one of {POSITIONS}")
        self.dtype = layers.compute_dtype(dtype)
        self.width, self.heads = width, heads
        self.positions, self.pre_norm = positions, pre_norm
        init = nnx.initializers.normal(0.02)
        e = embed_dim or width
        norm = lambda dim: layers.LayerNorm(dim, rngs=rngs, dtype=self.dtype, eps=norm_eps)
        if tie_to is not None:  # the same Param objects: one table in the state, gradients from both users
            if tie_to.token_embed.shape != (vocab_size, e):
                raise ValueError(f"tie_to's embeddings are {tie_to.token_embed.shape}, need {(vocab_size, e)}")
            self.token_embed, self.pos_embed, self.embed_norm = tie_to.token_embed, tie_to.pos_embed, tie_to.embed_norm
        else:
            self.token_embed = layers.param(rngs, init, (vocab_size, e), ("vocab", "embed"), "embedding")
            self.pos_embed = (layers.param(rngs, init, (max_len, e), (None, "embed"), "position")
                              if positions == "learned" else None)
            self.embed_norm = None if pre_norm else norm(e)
        self.embed_proj = layers.Dense(e, width, ("embed", "embed"), rngs=rngs, dtype=self.dtype) if e != width else None
        self.blocks = layers.Stack(depth, width, heads, int(width * mlp_ratio), rngs=rngs, dtype=self.dtype,
                                   pre_norm=pre_norm, remat=remat, qkv_bias=qkv_bias, norm_eps=norm_eps,
                                   attention=attention)
        self.final_norm = norm(width) if pre_norm else None
        if lm_head:  # BERT's prediction head; a contrastive text tower (FLIP) has none
            self.head_dense = layers.Dense(width, e, ("embed", "embed"), rngs=rngs, dtype=self.dtype)
            self.head_norm = norm(e)
            self.output_bias = layers.param(rngs, layers.zeros, (vocab_size,), ("vocab",), "bias")

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = jnp.take(self.token_embed[...], tokens, axis=0)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        x = x.astype(self.dtype)
        x = self.embed_norm(x) if self.embed_norm is not None else x
        return self.embed_proj(x) if self.embed_proj is not None else x

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 causal: bool = False) -> jax.Array:
        x = sharding.constrain(self.embed(tokens, positions), ("batch", "act_length", "act_embed"))
        rope = layers.rotary_tables(positions, self.width // self.heads) if self.positions == "rotary" else None
        x = self.blocks(x, segment_mask(segment_ids, causal), rope)
        return self.final_norm(x) if self.final_norm is not None else x

    def logits(self, hidden: jax.Array) -> jax.Array:
        h = self.head_norm(jax.nn.gelu(self.head_dense(hidden), approximate=False))
        out = jnp.einsum("...d,vd->...v", h, self.token_embed[...].astype(self.dtype))
        return out.astype(jnp.float32) + self.output_bias[...]


def flops(batch: int, length: int, width: int, depth: int, mlp_dim: int, vocab: int, predicted: int) -> int:
    """Forward FLOPs: blocks on all ``length`` tokens + the head at ``predicted`` positions per row."""
    head = 2 * batch * predicted * (width * width + width * vocab)
    return layers.transformer_flops(batch, length, width, depth, mlp_dim) + head
