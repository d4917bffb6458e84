"""MAE (He et al. 2021): the encoder sees only the visible patches; a light decoder fills in mask
tokens, unshuffles with ``restore_idx`` and predicts pixels; MSE on the masked patches only.

The same code trains video MAE (VideoMAE / MAE-ST): ``data.frames > 0`` gives 3D tubelets and
``mask.kind`` 'tube' or 'spatiotemporal' picks the video masking.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import objectives
from maskjax.config import ConfigError
from maskjax.models import layers, vit
from maskjax.objectives.vision import VisionObjective, norm_pix


def masked_mse(pred: jax.Array, target: jax.Array, hidden: jax.Array) -> jax.Array:
    """Mean over hidden patches of the per-patch MSE. pred, target [B, L, P]; hidden [B, L] bool.
    Visible patches contribute nothing, to the value or to the gradient."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weight = hidden.astype(jnp.float32)
    return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class MAEDecoder(nnx.Module):
    """latent [B, prefix + K, enc_width] + restore_idx [B, L] -> pixel predictions [B, L, patch_dim]."""

    def __init__(self, *, enc_width: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 grid, patch_dim: int, num_prefix: int, dtype: str, remat: str, one_hot_gather: bool,
                 rngs: nnx.Rngs):
        self.dtype = layers.compute_dtype(dtype)
        self.grid, self.width, self.num_prefix = tuple(grid), width, num_prefix
        self.embed = layers.Dense(enc_width, width, ("embed", "embed"), rngs=rngs, dtype=self.dtype)
        self.mask_token = layers.param(rngs, nnx.initializers.normal(0.02), (1, 1, width), (None, None, "embed"))
        self.blocks = layers.Stack(depth, width, heads, int(width * mlp_ratio), rngs=rngs,
                                   dtype=self.dtype, remat=remat)
        self.norm = layers.LayerNorm(width, rngs=rngs, dtype=self.dtype)
        self.pred = layers.Dense(width, patch_dim, ("embed", "patch"), rngs=rngs, dtype=self.dtype)
        self.one_hot_gather = one_hot_gather

    def __call__(self, latent: jax.Array, restore_idx: jax.Array) -> jax.Array:
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        batch, length = restore_idx.shape
        fill = jnp.broadcast_to(self.mask_token[...].astype(self.dtype), (batch, length - visible.shape[1], self.width))
        tokens = layers.gather_tokens(jnp.concatenate([visible, fill], axis=1), restore_idx, self.one_hot_gather)
        tokens = tokens + jnp.asarray(vit.sincos_pos_embed(self.width, self.grid), self.dtype)[None]
        x = self.norm(self.blocks(jnp.concatenate([prefix, tokens], axis=1)))
        return self.pred(x[:, self.num_prefix:])


class MAEModel(nnx.Module):
    def __init__(self, encoder: vit.ViTEncoder, decoder: MAEDecoder):
        self.encoder, self.decoder = encoder, decoder


@objectives.register
class MAE(VisionObjective):
    name = "mae"

    def validate(self) -> None:
        super().validate()
        dec = self.config.decoder
        if dec.width % dec.heads:
            raise ConfigError("decoder.heads", f"{dec.heads} does not divide decoder.width={dec.width}")

    def build(self, rngs: nnx.Rngs) -> MAEModel:
        m, dec = self.config.model, self.config.decoder
        encoder = vit.encoder_from_config(self.config, rngs)
        decoder = MAEDecoder(
            enc_width=m.width, width=dec.width, depth=dec.depth, heads=dec.heads, mlp_ratio=m.mlp_ratio,
            grid=self.token_grid, patch_dim=self.patch_dim, num_prefix=encoder.num_prefix,
            dtype=m.dtype, remat=m.remat, one_hot_gather=m.get("one_hot_gather", False), rngs=rngs,
        )
        return MAEModel(encoder, decoder)

    def predict(self, model: MAEModel, batch: dict, key: jax.Array):
        """Returns (patches, mask, predictions [B, L, patch_dim] float32)."""
        patches = self.patches(batch)
        mask = self.masker()(key, patches.shape[0])
        latent = model.encoder(patches, mask.keep_idx)
        pred = model.decoder(latent, mask.restore_idx).astype(jnp.float32)
        return patches, mask, pred

    def loss(self, model: MAEModel, batch: dict, key: jax.Array, step: jax.Array):
        patches, mask, pred = self.predict(model, batch, key)
        target = norm_pix(patches) if self.config.loss.norm_pix else patches
        loss = masked_mse(pred, target, mask.mask)
        return loss, {"loss": loss, "mask_ratio": jnp.mean(mask.mask.astype(jnp.float32))}

    def reconstruct(self, model: MAEModel, batch: dict, key: jax.Array) -> dict:
        """Images for a person: input, masked input (hidden patches grey), reconstruction with the
        visible patches pasted back. In the normalised pixel space of ``batch['image']``."""
        patches, mask, pred = self.predict(model, batch, key)
        if self.config.loss.norm_pix:  # undo the per-patch standardisation with the true statistics
            mean = jnp.mean(patches, axis=-1, keepdims=True)
            std = jnp.sqrt(jnp.var(patches, axis=-1, keepdims=True) + 1e-6)
            pred = pred * std + mean
        return self.reconstruction_images(batch, patches, mask.mask, pred)

    def flops(self) -> int:
        m, dec, b = self.config.model, self.config.decoder, self.config.batch_size
        length = self.num_tokens
        kept = self.num_kept
        prefix = 1 if m.cls_token else 0
        decoder = (
            2 * b * (kept + prefix) * m.width * dec.width
            + layers.transformer_flops(b, length + prefix, dec.width, dec.depth, int(dec.width * m.mlp_ratio))
            + 2 * b * length * dec.width * self.patch_dim
        )
        return 3 * (self.encoder_flops(kept) + decoder)

