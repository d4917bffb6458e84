"""What every pixel-reconstruction objective (MAE, SimMIM, video MAE) shares: config checks, the
batch layout, patch targets, the masker for the token grid, and frozen features for probes."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskjax import masking, objectives
from maskjax.config import ConfigError
from maskjax.models import layers, vit


def norm_pix(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Standardises each patch vector by its own mean and variance (MAE's ``norm_pix_loss``)."""
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + eps)


class VisionObjective:
    """Base for objectives over images [B, H, W, C] or videos [B, T, H, W, C] in ``batch['image']``."""

    name = "vision"
    data_kind = "image"

    def __init__(self, config):
        self.config = config
        data, model = config.data, config.model
        self.frames = data.get("frames", 0)
        self.tubelet = model.get("tubelet", 1) if self.frames else 1

    # ---------------------------------------------------------------- config
    def validate(self) -> None:
        data, model = self.config.data, self.config.model
        try:
            vit.token_grid(data.image_size, model.patch_size, self.frames, self.tubelet)
        except ValueError as err:
            key = "data.frames" if "frames" in str(err) else "model.tubelet" if "tubelet=" in str(err) else "data.image_size"
            raise ConfigError(key, str(err)) from None
        objectives.check_transformer(model)
        if data.channels < 1:
            raise ConfigError("data.channels", f"must be >= 1, got {data.channels}")
        try:
            self.masker()
        except ValueError as err:
            raise ConfigError("mask", str(err)) from None

    # ---------------------------------------------------------------- layout
    @property
    def token_grid(self) -> tuple[int, int, int]:
        return vit.token_grid(self.config.data.image_size, self.config.model.patch_size, self.frames, self.tubelet)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        return self.config.model.patch_size ** 2 * self.config.data.channels * self.tubelet

    def image_shape(self) -> tuple[int, ...]:
        d = self.config.data
        hw = (d.image_size, d.image_size, d.channels)
        return (self.frames,) + hw if self.frames else hw

    def batch_spec(self) -> dict:
        b = self.config.batch_size
        return {"image": ((b,) + self.image_shape(), jnp.float32), "label": ((b,), jnp.int32)}

    def patches(self, batch: dict) -> jax.Array:
        return vit.patchify(batch["image"].astype(jnp.float32), self.config.model.patch_size, self.tubelet)

    @property
    def num_kept(self) -> int:
        """Static visible-token count of the configured masker (from shapes only)."""
        return jax.eval_shape(lambda k: self.masker()(k, 1), jax.random.key(0)).keep_idx.shape[1]

    def masker(self):
        t, h, w = self.token_grid
        return masking.make_masker(self.config.mask, t, (h, w))

    def reconstruction_images(self, batch: dict, patches: jax.Array, hidden: jax.Array, pred: jax.Array) -> dict:
        """Images for a person: input, masked input (hidden patches at 0, the mean), and the
        prediction with the visible patches pasted back. patches/pred [B, L, P], hidden [B, L]."""
        hidden = hidden[..., None]
        to_image = lambda x: vit.unpatchify(x, self.image_shape(), self.config.model.patch_size, self.tubelet)
        return {
            "input": batch["image"],
            "masked": to_image(jnp.where(hidden, 0.0, patches)),
            "reconstruction": to_image(jnp.where(hidden, pred, patches)),
        }

    # ---------------------------------------------------------------- eval hooks
    def features(self, model, batch: dict) -> jax.Array:
        """[B, width] mean-pooled encoder features of the unmasked input."""
        return model.encoder.features(self.patches(batch))

    def encoder_flops(self, tokens: int) -> int:
        """Forward FLOPs of the encoder on ``tokens`` visible tokens (+cls), patch embedding on all."""
        m, b = self.config.model, self.config.batch_size
        prefix = 1 if m.cls_token else 0
        embed = 2 * b * self.num_tokens * self.patch_dim * m.width
        blocks = layers.transformer_flops(b, tokens + prefix, m.width, m.depth, int(m.width * m.mlp_ratio))
        return embed + blocks
