"""MAGE (Li et al. 2023): one model for generation and representation, by masked token modelling with
a variable mask ratio and an MAE-style encoder-decoder over the frozen tokenizer's codes.

Re-derived from the official PyTorch code (LTH14/mage: ``models_mage.py``, ``main_pretrain.py``):

* **ratio**: per example, a mask ratio from a normal(0.55, 0.25) truncated to [0.5, 1.0]
  (``mage.ratio_*``); the official code draws one ratio per GPU batch, which has the same marginal
  per token; per example keeps each row's draw independent of the batch it lands in.
* **masking**: from one uniform noise per token, the ceil(0.5 N) lowest are *dropped* (the encoder never
  sees them; a static count, so shapes never change) and the ceil(ratio N) lowest are *masked* (a
  superset: the masked-but-kept ones enter the encoder as [MASK]).
* **encoder**: [a fake class token] + kept tokens, token + learned position embeddings, pre-norm ViT
  blocks, final LayerNorm. **decoder**: a linear map to the decoder width, the decoder's mask token at
  every masked position (dropped or not), learned positions, blocks, LayerNorm, then the MLM head
  (dense to the encoder width + GELU + LayerNorm, logits against the encoder's token table + bias).
* **loss**: label-smoothed (0.1) cross-entropy on masked positions.
* **representation**: the encoder on all tokens unmasked, mean over image tokens (linear probe and
  k-NN through the existing probe evaluator, the tokenizer frozen as in training).
* **generation**: MaskGIT's parallel decoding with nothing dropped (the official ``gen_image``).

Not reproduced: the LayerNorm and dropout of MAGE's ``BertEmbeddings`` and its dropout 0.1 (maskjax
models have no dropout), and the conv VQGAN tokenizer (a ViT VQ tokenizer trained by maskjax instead).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import masking
from maskjax.errors import ConfigError
from maskjax.models import layers, text
from maskjax.objectives import base
from maskjax.objectives.maskgit import GENERATE, TOKENIZER, TokenObjective, parallel_decode


class MAGEModel(nnx.Module):
    def __init__(self, enc: layers.Transformer, dec: layers.Transformer, vocab: int, length: int, *, rngs: nnx.Rngs):
        self.encoder = text.TextEncoder(enc, text.TextEmbedding(vocab, length), lm_head=False, rngs=rngs)
        dtype = dec.dtype
        self.decoder_embed = layers.Dense(enc.width, dec.width, ("embed", "embed"), rngs=rngs, dtype=dtype)
        init = nnx.initializers.normal(0.02)
        self.mask_token = layers.param(rngs, init, (dec.width,), ("embed",), "token")
        self.decoder_pos = layers.param(rngs, init, (length, dec.width), (None, "embed"), "position")
        self.decoder = layers.Stack(dec, rngs=rngs)
        self.decoder_norm = layers.LayerNorm(dec.width, rngs=rngs, dtype=dtype, eps=dec.norm_eps)
        self.head_dense = layers.Dense(dec.width, enc.width, ("embed", "embed"), rngs=rngs, dtype=dtype)
        self.head_norm = layers.LayerNorm(enc.width, rngs=rngs, dtype=dtype, eps=enc.norm_eps)
        self.output_bias = layers.param(rngs, layers.zeros, (vocab,), ("vocab",), "bias")

    def encode(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens, positions [B, n] (position 0 = the class token) -> [B, n, width] (final-normed)."""
        return self.encoder(tokens, jnp.ones(tokens.shape, jnp.int32), positions)

    def decode(self, x: jax.Array, restore_idx: jax.Array, masked: jax.Array, codes: int) -> jax.Array:
        """Encoder outputs [B, 1 + kept, width] -> code logits [B, L, codes]: kept tokens put back in
        place (``restore_idx`` [B, L] into concat(kept, dropped)), the mask token at ``masked`` [B, L]."""
        y = self.decoder_embed(x)
        b, length = masked.shape
        mask = jnp.broadcast_to(self.mask_token[...].astype(y.dtype), (b, length - (y.shape[1] - 1), y.shape[-1]))
        full = jnp.take_along_axis(jnp.concatenate([y[:, 1:], mask], axis=1), restore_idx[..., None], axis=1)
        full = jnp.where(masked[..., None], self.mask_token[...].astype(y.dtype), full)
        h = jnp.concatenate([y[:, :1], full], axis=1) + self.decoder_pos[...].astype(y.dtype)[None]
        h = self.decoder_norm(self.decoder(h))[:, 1:]
        h = self.head_norm(layers.gelu(self.head_dense(h)))
        table = self.encoder.token_embed[...][:codes].astype(h.dtype)
        return jnp.einsum("bld,vd->blv", h, table).astype(jnp.float32) + self.output_bias[...][:codes]


@base.register
class MAGE(TokenObjective):
    name = "mage"
    group = "mage"
    config_groups = {
        "mage": {
            **TOKENIZER,
            "ratio_min": (0.5, "Smallest mask ratio; also the share always dropped from the encoder's input."),
            "ratio_max": (1.0, "Largest mask ratio."),
            "ratio_mean": (0.55, "Mean of the truncated normal the mask ratio is drawn from."),
            "ratio_std": (0.25, "Standard deviation of that normal."),
            "label_smoothing": (0.1, "Label smoothing of the token cross-entropy (MAGE's 0.1)."),
        },
        "generate": GENERATE,
    }
    papers = {
        "mage": {
            "title": "MAGE: MAsked Generative Encoder to Unify Representation Learning and Image Synthesis "
                     "(Li et al. 2023), ViT-B",
            "official": "LTH14/mage (models_mage.py, main_pretrain.py)",
            "values": {"batch_size": 4096, "optim.base_lr": 1.5e-4, "optim.b1": 0.9, "optim.b2": 0.95,
                       "optim.weight_decay": 0.05, "model.width": 768, "model.depth": 12, "model.heads": 12,
                       "decoder.width": 768, "decoder.depth": 8, "decoder.heads": 16,
                       "mage.ratio_min": 0.5, "mage.ratio_max": 1.0, "mage.ratio_mean": 0.55,
                       "mage.ratio_std": 0.25, "mage.label_smoothing": 0.1, "data.image_size": 256},
        },
    }

    def validate(self) -> None:
        super().validate()
        g = self.config.mage
        base.check_transformer(self.config.decoder, "decoder", config=self.config)
        try:
            masking.truncated_normal_ratio(jax.random.key(0), (1,), g.ratio_min, g.ratio_max, g.ratio_mean, g.ratio_std)
        except ValueError as err:
            raise ConfigError("mage.ratio_min", str(err)) from None
        if g.ratio_min <= 0 or self.num_dropped >= self.num_tokens:
            raise ConfigError("mage.ratio_min", f"{g.ratio_min} must leave the encoder at least one token of {self.num_tokens}")

    @property
    def num_dropped(self) -> int:
        return math.ceil(self.num_tokens * self.config.mage.ratio_min - 1e-6)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 2  # codes, [MASK], the fake class token

    @property
    def class_id(self) -> int:
        return self.codebook_size + 1

    @property
    def mask_ratio(self) -> float:
        return float(self.config.mage.ratio_mean)

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ("probe", "generation")

    def build(self, rngs: nnx.Rngs) -> MAGEModel:
        m, d = self.config.model, self.config.decoder
        enc = layers.Transformer.from_model(m)
        dec = layers.Transformer.from_model(m, width=d.width, depth=d.depth, heads=d.heads)
        return MAGEModel(enc, dec, self.vocab_size, self.num_tokens + 1, rngs=rngs)

    def _with_class(self, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        b = tokens.shape[0]
        cls = jnp.full((b, 1), self.class_id, jnp.int32)
        return jnp.concatenate([cls, tokens], 1), jnp.concatenate([jnp.zeros((b, 1), jnp.int32), positions + 1], 1)

    def logits(self, model: MAGEModel, tokens: jax.Array, dropped: masking.Mask, masked: jax.Array) -> jax.Array:
        """Code logits [B, L, K]: ``tokens`` [B, L] with [MASK] at ``masked``; the encoder sees the
        tokens ``dropped.keep_idx`` selects."""
        kept = jnp.take_along_axis(tokens, dropped.keep_idx, axis=1)
        x = model.encode(*self._with_class(kept, dropped.keep_idx))
        return model.decode(x, dropped.restore_idx, masked, self.codebook_size)

    def draw(self, key: jax.Array, batch: dict) -> tuple[masking.Mask, jax.Array]:
        """Per example: (the dropped tokens as a Mask with a static kept count, masked [B, L] bool)."""
        g, length = self.config.mage, self.num_tokens
        k_ratio, k_noise = masking.split_rows(base.example_keys(key, batch), 2)
        ratio = jax.vmap(lambda k: masking.truncated_normal_ratio(k, (), g.ratio_min, g.ratio_max, g.ratio_mean,
                                                                  g.ratio_std))(k_ratio)
        noise = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(k_noise)
        count = jnp.clip(jnp.ceil(ratio * length - 1e-6), self.num_dropped, length).astype(jnp.int32)
        masked = masking.lowest(noise, count)
        dropped = masking.lowest(noise, jnp.full((noise.shape[0],), self.num_dropped))
        return masking.from_bool_mask(dropped, length - self.num_dropped), masked

    def loss(self, model: MAGEModel, batch: dict, key: jax.Array, step: jax.Array, teacher):
        tokens = self.tokenize(teacher, batch)
        dropped, masked = self.draw(key, batch)
        return self.masked_loss(self.logits(model, jnp.where(masked, self.mask_id, tokens), dropped, masked), tokens,
                                masked)

    def _nothing_dropped(self, b: int) -> masking.Mask:
        idx = jnp.broadcast_to(jnp.arange(self.num_tokens, dtype=jnp.int32), (b, self.num_tokens))
        return masking.Mask(jnp.zeros((b, self.num_tokens), bool), idx, idx)

    def features(self, model: MAGEModel, batch: dict, *, teacher) -> jax.Array:
        """[B, width]: the encoder on every token of the image, mean over image tokens."""
        tokens = self.tokenize(teacher, batch)
        full = self._nothing_dropped(tokens.shape[0])
        return jnp.mean(model.encode(*self._with_class(tokens, full.keep_idx))[:, 1:], axis=1).astype(jnp.float32)

    def sample(self, model: MAGEModel, key: jax.Array, num: int, steps: int, labels: jax.Array | None = None,
               temperature: float | None = None, guidance: float | None = None, trace: bool = False):
        """Unconditional tokens [num, L] by parallel decoding (``labels`` and ``guidance`` are not used:
        MAGE generates without classes)."""
        gen = self.config.generate
        temperature = gen.choice_temperature if temperature is None else temperature
        full = self._nothing_dropped(num)
        start = jnp.full((num, self.num_tokens), self.mask_id, jnp.int32)
        return parallel_decode(lambda m, z: self.logits(m, z, full, z == self.mask_id), model, start, self.mask_id,
                               steps, key, schedule=gen.schedule, choice_temperature=temperature, trace=trace)

    def flops(self) -> int:
        m, d, b = self.config.model, self.config.decoder, self.config.batch_size
        length, kept = self.num_tokens, self.num_tokens - self.num_dropped
        encoder = layers.transformer_flops(b, kept + 1, m.width, m.depth, int(m.width * m.mlp_ratio))
        decoder = (2 * b * (kept + 1) * m.width * d.width
                   + layers.transformer_flops(b, length + 1, d.width, d.depth, int(d.width * m.mlp_ratio))
                   + 2 * b * length * (d.width * m.width + m.width * self.codebook_size))
        return 3 * (encoder + decoder) + self.tokenizer_flops()
