"""Vision Transformer for images (2D patches) and videos (3D tubelets), with fixed sin-cos positions.

Token layout is time-major: token ``t * h * w + y * w + x``. Images are videos of one token frame
(``frames == 1``), so every function here serves both.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax import sharding
from maskjax.models import layers


def token_grid(image_size: int, patch_size: int, frames: int = 0, tubelet: int = 1) -> tuple[int, int, int]:
    """(token frames, grid height, grid width) for square images, or videos when ``frames > 0``."""
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r} must be a positive int")
    if not isinstance(image_size, int) or image_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size={image_size!r} is not divisible by patch_size={patch_size}")
    side = image_size // patch_size
    if not frames:
        return 1, side, side
    if not isinstance(tubelet, int) or tubelet < 1:
        raise ValueError(f"tubelet={tubelet!r} must be a positive int")
    if frames < tubelet or frames % tubelet:
        raise ValueError(f"frames={frames} (video length) is not divisible by tubelet={tubelet}")
    return frames // tubelet, side, side


def patchify(x: jax.Array, patch_size: int, tubelet: int = 1) -> jax.Array:
    """images [B, H, W, C] -> [B, L, p*p*C]; videos [B, T, H, W, C] -> [B, L, t*p*p*C].

    Each patch vector is ordered (t, y, x, channel), the layout of a conv kernel flattened.
    """
    if x.ndim == 4:
        x, tubelet = x[:, None], 1
    b, t, h, w, c = x.shape
    p, q = patch_size, tubelet
    x = x.reshape(b, t // q, q, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (t // q) * (h // p) * (w // p), q * p * p * c)


def unpatchify(patches: jax.Array, shape: Sequence[int], patch_size: int, tubelet: int = 1) -> jax.Array:
    """Inverse of :func:`patchify`; ``shape`` is the per-example image or video shape."""
    b = patches.shape[0]
    if len(shape) == 3:
        (h, w, c), t, tubelet = shape, 1, 1
    else:
        t, h, w, c = shape
    p, q = patch_size, tubelet
    x = patches.reshape(b, t // q, h // p, w // p, q, p, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, c)
    return x[:, 0] if len(shape) == 3 else x


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, grid: Sequence[int]) -> np.ndarray:
    """Fixed sin-cos position embedding [t*h*w, dim] (MAE's 2D form; time gets a quarter of the dims
    when ``t > 1``). Constant: computed in NumPy at trace time, never a parameter.

    The order of the halves is the MAE release's (``util/pos_embed.py``: the first half encodes the
    column, the second the row), so published MAE weights and Hugging Face ViTMAE tables match it."""
    t, h, w = grid
    gt, gy, gx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    dim_t = 2 * (dim // 8) if t > 1 else 0
    dim_yx = 2 * ((dim - dim_t) // 4)
    parts = [_sincos_1d(dim_yx, gx), _sincos_1d(dim_yx, gy)]
    if dim_t:
        parts.insert(0, _sincos_1d(dim_t, gt))
    emb = np.concatenate(parts, axis=1)
    emb = np.pad(emb, ((0, 0), (0, dim - emb.shape[1])))
    return emb.astype(np.float32)


def sinusoid_table(dim: int, length: int) -> np.ndarray:
    """VideoMAE's fixed table [length, dim] over the flattened token index (``get_sinusoid_encoding_table``
    of MCG-NJU/VideoMAE and transformers' VideoMAE): angle pos / 10000^(2 floor(j/2) / dim), sine on even
    dimensions, cosine on odd ones (interleaved, where MAE's tables put the halves side by side)."""
    j = np.arange(dim)
    angles = np.arange(length, dtype=np.float64)[:, None] / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    return np.where(j % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)


POSITIONS = ("sincos", "sincos_1d")


def position_table(kind: str, dim: int, grid: Sequence[int]) -> np.ndarray:
    """The fixed positions [t*h*w, dim] of ``model.pos_embed``: 'sincos' (MAE's separable form,
    :func:`sincos_pos_embed`) or 'sincos_1d' (VideoMAE's table over the flattened index,
    :func:`sinusoid_table`)."""
    if kind == "sincos":
        return sincos_pos_embed(dim, grid)
    if kind == "sincos_1d":
        return sinusoid_table(dim, int(np.prod(grid)))
    raise ValueError(f"model.pos_embed={kind!r} must be one of {POSITIONS}")


class ViTEncoder(nnx.Module):
    """Patch embedding + fixed positions + optional cls token + scanned pre-norm blocks + norm; with
    ``t.pre_norm`` False, post-norm blocks after a LayerNorm on the tokens and none at the end (BERT's
    order; data2vec 2.0's image encoder).

    Call with patch vectors [B, L, patch_dim] (see :func:`patchify`) and, for MAE, ``keep_idx``
    [B, K]: only those tokens go through the blocks. Returns [B, (1 +) K, width], cls first.
    ``positions``: a kind of :func:`position_table`.
    """

    def __init__(self, t: layers.Transformer, *, patch_dim: int, grid: Sequence[int], cls_token: bool = True,
                 positions: str = "sincos", rngs: nnx.Rngs):
        self.grid = tuple(grid)
        self.positions = positions
        position_table(positions, t.width, self.grid)  # a bad kind fails here, not at the first step
        self.width = width = t.width
        self.dtype = t.dtype
        self.patch_embed = layers.Dense(patch_dim, width, ("patch", "embed"), rngs=rngs, dtype=self.dtype)
        self.cls = (
            layers.param(rngs, nnx.initializers.normal(0.02), (1, 1, width), (None, None, "embed"), "token")
            if cls_token else None
        )
        self.blocks = layers.Stack(t, rngs=rngs)
        self.norm = layers.LayerNorm(width, rngs=rngs, dtype=self.dtype, eps=t.norm_eps)
        self.pre_norm = t.pre_norm
        self.one_hot_gather = t.one_hot_gather

    @property
    def num_prefix(self) -> int:
        return 0 if self.cls is None else 1

    def add_positions(self, tokens: jax.Array) -> jax.Array:
        """Adds the fixed positions to [B, L, width] tokens (all L, in grid order)."""
        return tokens + jnp.asarray(position_table(self.positions, self.width, self.grid), tokens.dtype)[None]

    def embed(self, patches: jax.Array) -> jax.Array:
        """[B, L, patch_dim] -> [B, L, width] tokens with positions added (no cls)."""
        return self.add_positions(self.patch_embed(patches))

    def run(self, tokens: jax.Array, collect: bool = False):
        """Prepends cls, runs the blocks and the norm: [B, K, D] -> [B, (1 +) K, D]; with ``collect`` also
        each block's MLP output [depth, B, (1 +) K, D] (:meth:`layers.Block.__call__`)."""
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (tokens.shape[0], 1, self.width))
            tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens = sharding.constrain(tokens, ("batch", "act_length", "act_embed"))
        if not self.pre_norm:
            return self.blocks(self.norm(tokens), collect=collect)
        out = self.blocks(tokens, collect=collect)
        return (self.norm(out[0]), out[1]) if collect else self.norm(out)

    def __call__(self, patches: jax.Array, keep_idx: jax.Array | None = None) -> jax.Array:
        tokens = self.embed(patches)
        if keep_idx is not None:
            tokens = layers.gather_tokens(tokens, keep_idx, self.one_hot_gather)
        return self.run(tokens)

    def features(self, patches: jax.Array) -> jax.Array:
        """Mean-pooled patch-token features [B, width] of the unmasked input (for probes)."""
        out = self(patches)
        return jnp.mean(out[:, self.num_prefix:].astype(jnp.float32), axis=1)


def encoder_from_config(config, rngs: nnx.Rngs) -> ViTEncoder:
    """The ViT encoder described by ``config.model`` for ``config.data``'s images or videos."""
    m, d = config.model, config.data
    grid = token_grid(d.image_size, m.patch_size, d.frames, m.tubelet)
    patch_dim = m.patch_size * m.patch_size * d.channels * (m.tubelet if d.frames else 1)
    return ViTEncoder(layers.Transformer.from_model(m, pre_norm=m.pre_norm), patch_dim=patch_dim, grid=grid,
                      cls_token=m.cls_token, positions=m.pos_embed, rngs=rngs)
