"""SimMIM (Xie et al. 2022): the full token sequence goes through the encoder with a learned mask
token in place of the hidden patches; a linear head predicts raw pixels; L1 on the hidden pixels.
With ``loss.target='hog'`` it is MaskFeat (Wei et al. 2022): HOG targets and MSE.

It is also the full-sequence baseline against which MAE's encoder saving is measured.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax.objectives import base
from maskjax.models import layers, vit
from maskjax.objectives.vision import VisionObjective


class SimMIMModel(nnx.Module):
    def __init__(self, encoder: vit.ViTEncoder, target_dim: int, rngs: nnx.Rngs):
        self.encoder = encoder
        self.mask_token = layers.param(rngs, nnx.initializers.normal(0.02), (1, 1, encoder.width), (None, None, "embed"), "token")
        self.head = layers.Dense(encoder.width, target_dim, ("embed", "patch"), rngs=rngs, dtype=encoder.dtype)

    def __call__(self, patches: jax.Array, hidden: jax.Array) -> jax.Array:
        """patches [B, L, P], hidden [B, L] bool -> predictions [B, L, P] float32."""
        enc = self.encoder
        tokens = enc.patch_embed(patches)
        tokens = jnp.where(hidden[..., None], self.mask_token[...].astype(tokens.dtype), tokens)
        out = enc.run(enc.add_positions(tokens))[:, enc.num_prefix:]
        return self.head(out).astype(jnp.float32)


@base.register
class SimMIM(VisionObjective):
    name = "simmim"
    papers = {
        "simmim": {
            "title": "SimMIM: a Simple Framework for Masked Image Modeling (Xie et al. 2022), ViT-B/16, 800 epochs",
            "official": "microsoft/SimMIM (data/data_simmim.py, models/simmim.py)",
            "values": {"batch_size": 2048, "optim.base_lr": 1e-4, "optim.base_batch": 512, "optim.b1": 0.9,
                       "optim.b2": 0.999, "optim.weight_decay": 0.05, "optim.clip_norm": 5.0, "data.image_size": 224,
                       "model.patch_size": 16, "model.width": 768, "model.depth": 12, "mask.kind": "grid",
                       "mask.ratio": 0.6, "mask.cell": 2, "loss.target": "pixels"},
        },
    }
    interop = base.Interop(archs=("vit_mim", "vit"), encoder="encoder")

    def build(self, rngs: nnx.Rngs) -> SimMIMModel:
        return SimMIMModel(vit.encoder_from_config(self.config, rngs), self.target_dim, rngs)

    def predict(self, model: SimMIMModel, batch: dict, key: jax.Array):
        patches = self.patches(batch)
        hidden = self.draw_mask(base.example_keys(key, batch)).mask
        return patches, hidden, model(patches, hidden)

    def loss(self, model: SimMIMModel, batch: dict, key: jax.Array, step: jax.Array):
        patches = self.patches(batch)
        return self.masked_loss(model, batch, patches, self.draw_mask(base.example_keys(key, batch)).mask)

    def masked_loss(self, model: SimMIMModel, batch: dict, patches: jax.Array, hidden: jax.Array):
        """The loss given the hidden patches [B, L]: L1 (pixels) or MSE (HOG) on them, per element."""
        pred = model(patches, hidden)
        target = self.targets(batch, patches, norm=False)
        error = jnp.abs(pred - target) if self.target == "pixels" else jnp.square(pred - target)
        weight = hidden[..., None].astype(jnp.float32)
        loss = jnp.sum(error * weight) / (jnp.sum(weight) * target.shape[-1])
        return loss, {"loss": loss, "mask_ratio": jnp.mean(hidden.astype(jnp.float32))}

    def reconstruct(self, model: SimMIMModel, batch: dict, key: jax.Array) -> dict:
        patches, hidden, pred = self.predict(model, batch, key)
        return self.reconstruction_images(batch, patches, hidden, pred)

    def flops(self) -> int:
        m, b = self.config.model, self.config.batch_size
        head = 2 * b * self.num_tokens * m.width * self.target_dim
        return 3 * (self.encoder_flops(self.num_tokens) + head)
