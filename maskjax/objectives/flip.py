"""FLIP (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): CLIP with most image
patches dropped before the image tower.

Image tower: the ViT on the visible patches only (``mask.*``; FLIP uses random masking at 0.5),
mean-pooled. Text tower: the text encoder (``text_model.*``) on the caption, optionally with a share
``flip.text_mask_ratio`` of its words dropped, read at [CLS]. Linear projections to
``flip.embed_dim``, L2 normalisation, a learnable temperature (the log of the logit scale, starting
at ``log(1 / flip.init_temperature)`` and clipped to [0, log ``flip.max_logit_scale``]), and the
symmetric InfoNCE loss over the **global** batch: the loss is written on global arrays inside the
jitted step, so every image is contrasted with every caption of the whole batch on every device and
host (the compiler gathers the embeddings; the logits stay sharded by rows). Unmasked tuning is the
same config with ``mask.ratio=0``.

Zero-shot classification (``eval.zero_shot``): each class name in each prompt template through the
text tower, averaged per class; an image's class is its most similar class embedding.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax import masking, sharding
from maskjax.objectives import base
from maskjax.errors import ConfigError
from maskjax.models import layers, text as text_model, vit
from maskjax.objectives.vision import VisionObjective


def normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(image: jax.Array, text: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE of L2-normalised embeddings [B, E] whose row i are a pair; returns (loss,
    image->text top-1 accuracy). On sharded inputs the logits are [B, B] over the global batch."""
    logits = scale * jnp.einsum("ie,te->it", image, text)
    logits = sharding.constrain(logits, ("batch", None))
    labels = jnp.arange(logits.shape[0])
    log_i2t = jax.nn.log_softmax(logits, axis=1)
    log_t2i = jax.nn.log_softmax(logits, axis=0)
    diag = lambda m: jnp.take_along_axis(m, labels[:, None], axis=1)[:, 0]
    loss = -0.5 * (jnp.mean(diag(log_i2t)) + jnp.mean(diag(log_t2i.T)))
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return loss, accuracy


def clipped_logit_scale(log_scale: jax.Array, max_logit_scale: float) -> jax.Array:
    """exp of the learned log-scale clipped to [0, log max_logit_scale] (FLIP's
    ``compute_contrastive_loss``): inside the range the gradient flows, at the clip it stops."""
    return jnp.exp(jnp.clip(log_scale, 0.0, math.log(max_logit_scale)))


class FLIPModel(nnx.Module):
    def __init__(self, image: vit.ViTEncoder, text: text_model.TextEncoder, embed_dim: int,
                 init_temperature: float, rngs: nnx.Rngs):
        self.image, self.text = image, text
        self.image_proj = layers.Dense(image.width, embed_dim, ("embed", None), rngs=rngs, dtype=image.dtype,
                                       use_bias=False)
        self.text_proj = layers.Dense(text.width, embed_dim, ("embed", None), rngs=rngs, dtype=text.dtype,
                                      use_bias=False)
        scale = math.log(1.0 / init_temperature)
        self.log_scale = layers.param(rngs, nnx.initializers.constant(scale), (), (), "temperature")

    def embed_image(self, patches: jax.Array, keep_idx: jax.Array | None = None) -> jax.Array:
        """[B, L, P] patches (only ``keep_idx`` tokens encoded) -> [B, E] unit vectors."""
        out = self.image(patches, keep_idx)[:, self.image.num_prefix:]
        return normalize(self.image_proj(jnp.mean(out.astype(jnp.float32), axis=1)))

    def embed_text(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """Token ids [B, S] (segment 0 = not attended) -> [B, E] unit vectors, read at position 0 ([CLS])."""
        hidden = self.text(tokens, segment_ids, positions)
        return normalize(self.text_proj(hidden[:, 0]))


def drop_text_tokens(keys: jax.Array | None, tokens: jax.Array, tokenizer, ratio: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """FLIP's text masking: hide ``floor(ratio * n)`` of each caption's ``n`` word pieces ([CLS],
    [SEP] and padding are never hidden) and remove them, keeping original positions; ``keys``: one
    per caption ([B]; unused when ``ratio`` is 0). Returns
    (tokens, segment_ids, positions), cut to the longest possible kept length (static)."""
    batch, length = tokens.shape
    real = tokens != tokenizer.pad_id
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    if ratio <= 0:
        return tokens, real.astype(jnp.int32), positions
    eligible = real & (tokens != tokenizer.cls_id) & (tokens != tokenizer.sep_id)
    hidden = masking.per_row(lambda k, e: masking.random_bool_mask(k, e.shape, ratio, e), keys, eligible)
    keep = real & ~hidden
    kept_len = length - int(math.floor(ratio * (length - 2)))
    order = jnp.argsort(~keep, axis=-1, stable=True)[:, :kept_len].astype(jnp.int32)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    return take(tokens), take(keep).astype(jnp.int32), order


@base.register
class FLIP(VisionObjective):
    name = "flip"
    config_groups = {
        # the text tower; dtype and remat follow model.*, its position table covers data.seq_len
        "text_model": {
            "width": (64, "FLIP text tower width."),
            "depth": (2, "FLIP text tower blocks."),
            "heads": (4, "FLIP text tower heads."),
            "mlp_ratio": (4.0, "FLIP text tower MLP ratio."),
            "positions": ("learned", "FLIP text tower positions: learned or rotary."),
        },
        "flip": {
            "embed_dim": (64, "Joint image-text embedding size."),
            "init_temperature": (0.07, "Initial softmax temperature of the contrastive loss (learned)."),
            "max_logit_scale": (100.0, "Clip of the learned logit scale (1 / temperature)."),
            "text_mask_ratio": (0.0, "Share of caption tokens dropped (FLIP's text masking; 0 = off)."),
        },
    }
    papers = {
        "flip": {
            "title": "Scaling Language-Image Pre-training via Masking (Li et al. 2023), ViT-B/16 on LAION-400M",
            "official": "facebookresearch/flip (models_flip.py, configs/default.py, t5x/train_state_initializer.py, "
                        "utils/opt_util.py)",
            "values": {"batch_size": 32768, "optim.base_lr": 4e-6, "optim.base_batch": 256, "optim.b1": 0.9,
                       "optim.b2": 0.95, "optim.weight_decay": 0.2, "optim.min_lr_ratio": 0.0,
                       "optim.decay_roles": ("kernel", "embedding", "token", "temperature"),
                       "data.image_size": 224, "model.patch_size": 16,
                       "model.width": 768, "model.depth": 12, "mask.kind": "random", "mask.ratio": 0.5,
                       "flip.text_mask_ratio": 0.0, "flip.init_temperature": 0.07, "flip.max_logit_scale": 100.0},
        },
    }
    data_kind = "image_text"
    interop = base.Interop(archs=("vit",), encoder="image")
    evaluators = ("probe", "zero_shot")

    def summary(self, results: dict) -> tuple[str, float | None]:
        if "zero_shot" in results:
            return "zero_shot_accuracy", results["zero_shot"].get("accuracy")
        return super().summary(results)

    @functools.cached_property
    def tokenizer(self):
        from maskjax.data import sources

        return sources.load_tokenizer(self.config.data)

    def validate(self) -> None:
        super().validate()
        c = self.config
        base.check_transformer(c.text_model, "text_model", config=c)
        if c.text_model.positions not in text_model.POSITIONS:
            raise ConfigError("text_model.positions", f"must be one of {text_model.POSITIONS}, "
                                                      f"got {c.text_model.positions!r}")
        if not isinstance(c.data.seq_len, int) or c.data.seq_len < 3:
            raise ConfigError("data.seq_len", f"must be an int >= 3 ([CLS] word [SEP]), got {c.data.seq_len!r}")
        if not isinstance(c.flip.embed_dim, int) or c.flip.embed_dim < 1:
            raise ConfigError("flip.embed_dim", f"must be a positive int, got {c.flip.embed_dim!r}")
        if not c.flip.max_logit_scale > 1.0:
            raise ConfigError("flip.max_logit_scale", f"must be > 1, got {c.flip.max_logit_scale}")
        # The log-scale is clipped to [0, log max_logit_scale]; a start on or outside that range gets no
        # gradient from step 0, so the temperature would never learn. Checked in float32, as trained.
        temperature = c.flip.init_temperature
        start = np.float32(-math.log(temperature)) if temperature > 0 else np.float32(np.inf)
        if not 0.0 < start < np.float32(math.log(c.flip.max_logit_scale)):
            raise ConfigError("flip.init_temperature", f"{temperature} must be in (1/flip.max_logit_scale, 1) = "
                                                       f"({1.0 / c.flip.max_logit_scale:g}, 1), or the clipped "
                                                       f"logit scale gets no gradient and never learns")
        try:
            masking.check_ratio(c.flip.text_mask_ratio, "flip.text_mask_ratio")
        except ValueError as err:
            raise ConfigError("flip.text_mask_ratio", str(err)) from None
        if c.optim.grad_accum != 1:
            raise ConfigError("optim.grad_accum", "FLIP's contrastive loss needs the whole batch in one step "
                                                  "(accumulating micro-batches would contrast within each only)")
        from maskjax.data import sources

        sources.check_tokenizer(self.config.data)  # never prepares a corpus (validation writes nothing)

    def build(self, rngs: nnx.Rngs) -> FLIPModel:
        m, t = self.config.model, self.config.text_model
        text = text_model.TextEncoder(
            layers.Transformer.from_model(m, width=t.width, depth=t.depth, heads=t.heads, mlp_ratio=t.mlp_ratio),
            text_model.TextEmbedding(self.tokenizer.vocab_size, self.config.data.seq_len, t.positions),
            lm_head=False, rngs=rngs)
        return FLIPModel(vit.encoder_from_config(self.config, rngs), text, self.config.flip.embed_dim,
                         self.config.flip.init_temperature, rngs)

    def batch_spec(self) -> dict:
        spec = super().batch_spec()
        spec["text"] = ((self.config.batch_size, self.config.data.seq_len), jnp.int32)
        return spec

    def synthetic_batch(self, rng: np.random.Generator) -> dict:
        batch = super().synthetic_batch(rng)
        tok, (b, n) = self.tokenizer, (self.config.batch_size, self.config.data.seq_len)
        text = rng.integers(max(tok.special_ids) + 1, tok.vocab_size, (b, n), dtype=np.int32)
        text[:, 0], text[:, -1] = tok.cls_id, tok.sep_id
        batch["text"] = text
        return batch

    def logit_scale(self, model: FLIPModel) -> jax.Array:
        return clipped_logit_scale(model.log_scale[...], self.config.flip.max_logit_scale)

    def loss(self, model: FLIPModel, batch: dict, key: jax.Array, step: jax.Array):
        image_keys, text_keys = masking.split_rows(base.example_keys(key, batch))
        patches = self.patches(batch)
        mask = self.draw_mask(image_keys)
        image = model.embed_image(patches, mask.keep_idx)
        text = model.embed_text(*drop_text_tokens(text_keys, batch["text"], self.tokenizer,
                                                  self.config.flip.text_mask_ratio))
        scale = self.logit_scale(model)
        loss, accuracy = contrastive_loss(image, text, scale)
        return loss, {"loss": loss, "batch_accuracy": accuracy, "logit_scale": scale,
                      "mask_ratio": jnp.mean(mask.mask.astype(jnp.float32))}

    # ---------------------------------------------------------------- eval hooks
    def features(self, model: FLIPModel, batch: dict) -> jax.Array:
        """Mean-pooled image-tower features of the unmasked image (for probes), before projection."""
        return model.image.features(self.patches(batch))

    def class_embeddings(self, model: FLIPModel, tokens: jax.Array, num_classes: int) -> jax.Array:
        """Prompt tokens [C * T, S] (class-major) -> [C, E]: the mean of each class's prompt embeddings."""
        emb = model.embed_text(*drop_text_tokens(None, tokens, self.tokenizer, 0.0))
        return normalize(jnp.mean(emb.reshape(num_classes, -1, emb.shape[-1]), axis=1))

    def zero_shot_logits(self, model: FLIPModel, batch: dict, classes: jax.Array) -> jax.Array:
        """[B, C] similarity of each (unmasked) image to each class embedding."""
        return model.embed_image(self.patches(batch)) @ classes.T

    def flops(self) -> int:
        c, b = self.config, self.config.batch_size
        t, e = c.text_model, c.flip.embed_dim
        length = c.data.seq_len
        if c.flip.text_mask_ratio > 0:
            length -= int(math.floor(c.flip.text_mask_ratio * (length - 2)))
        text = layers.transformer_flops(b, length, t.width, t.depth, int(t.width * t.mlp_ratio))
        heads = 2 * b * e * (c.model.width + t.width) + 2 * b * b * e  # projections + global logits
        return 3 * (self.encoder_flops(self.num_kept) + text + heads)
