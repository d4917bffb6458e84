"""BERT-style bidirectional text encoder built from the same layers, sharding names and scan as the ViT.

Token embedding (tied with the output projection), learned or rotary positions, pre-norm (final
LayerNorm) or post-norm (BERT: LayerNorm on the embeddings, none at the end) blocks, attention
limited to the token's own segment for packed sequences, and BERT's prediction head
(dense + GELU + LayerNorm, then the tied embedding and an output bias). Embeddings narrower than the
blocks are projected up (ELECTRA's ``embedding_size``), and one encoder can use another's embedding
tables and their LayerNorm (ELECTRA's generator ties them to the discriminator's).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import sharding
from maskjax.models import layers

POSITIONS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class TextEmbedding:
    """The token and position tables of a text encoder: ``positions`` 'learned' (a table of
    ``max_len``) or 'rotary' (none; applied in attention); ``dim`` 0 = the encoder's width, else narrower
    tables projected up (ELECTRA-Small's 128-wide embeddings)."""
    vocab_size: int
    max_len: int
    positions: str = "learned"
    dim: int = 0

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r} must be one of {POSITIONS}")


class TextEncoder(nnx.Module):
    """tokens, segment_ids, positions [B, L] -> hidden [B, L, width]; :meth:`logits` maps hidden
    states [..., width] to vocabulary logits [..., vocab] (float32). ``t.pre_norm`` False is BERT's
    post-norm encoder (LayerNorm on the embeddings, none at the end). ``tie_to``: share another
    encoder's tables (the same Param objects)."""

    def __init__(self, t: layers.Transformer, emb: TextEmbedding, *, lm_head: bool = True,
                 tie_to: "TextEncoder | None" = None, rngs: nnx.Rngs):
        self.dtype = t.dtype
        self.width, self.heads = t.width, t.heads
        width = t.width
        self.positions, self.pre_norm = emb.positions, t.pre_norm
        init = nnx.initializers.normal(0.02)
        e = emb.dim or width
        norm = lambda dim: layers.LayerNorm(dim, rngs=rngs, dtype=self.dtype, eps=t.norm_eps)
        if tie_to is not None:  # the same Param objects: one table in the state, gradients from both users
            if tie_to.token_embed.shape != (emb.vocab_size, e):
                raise ValueError(f"tie_to's embeddings are {tie_to.token_embed.shape}, need {(emb.vocab_size, e)}")
            self.token_embed, self.pos_embed, self.embed_norm = tie_to.token_embed, tie_to.pos_embed, tie_to.embed_norm
        else:
            self.token_embed = layers.param(rngs, init, (emb.vocab_size, e), ("vocab", "embed"), "embedding")
            self.pos_embed = (layers.param(rngs, init, (emb.max_len, e), (None, "embed"), "position")
                              if emb.positions == "learned" else None)
            self.embed_norm = None if t.pre_norm else norm(e)
        self.embed_proj = layers.Dense(e, width, ("embed", "embed"), rngs=rngs, dtype=self.dtype) if e != width else None
        self.blocks = layers.Stack(t, rngs=rngs)
        self.final_norm = norm(width) if t.pre_norm else None
        if lm_head:  # BERT's prediction head; a contrastive text tower (FLIP) has none
            self.head_dense = layers.Dense(width, e, ("embed", "embed"), rngs=rngs, dtype=self.dtype)
            self.head_norm = norm(e)
            self.output_bias = layers.param(rngs, layers.zeros, (emb.vocab_size,), ("vocab",), "bias")

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
        x = self.blocks(x, layers.Segments.packed(segment_ids, causal), rope)
        return self.final_norm(x) if self.final_norm is not None else x

    def logits(self, hidden: jax.Array, rows: int | None = None) -> jax.Array:
        """``rows``: only the first ``rows`` entries of the vocabulary (a token model whose extra ids,
        [MASK] and classes, are inputs it never predicts)."""
        h = self.head_norm(layers.gelu(self.head_dense(hidden)))
        table, bias = self.token_embed[...], self.output_bias[...]
        if rows is not None:
            table, bias = table[:rows], bias[:rows]
        out = jnp.einsum("...d,vd->...v", h, table.astype(self.dtype))
        return out.astype(jnp.float32) + bias


def flops(batch: int, length: int, width: int, depth: int, mlp_dim: int, vocab: int, predicted: int) -> int:
    """Forward FLOPs: blocks on all ``length`` tokens + the head at ``predicted`` positions per row."""
    head = 2 * batch * predicted * (width * width + width * vocab)
    return layers.transformer_flops(batch, length, width, depth, mlp_dim) + head
