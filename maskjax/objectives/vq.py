"""A vector-quantised image tokenizer (VQ-VAE, van den Oord et al. 2017; the tokenizer role of
MaskGIT's VQGAN), trained by maskjax itself so that masked generative models have tokens to predict.

A ViT encoder maps the patches to vectors z, each replaced by its nearest codebook entry e (squared
Euclidean distance); a ViT decoder reconstructs the patches from the codes. Gradients pass the
quantisation straight through (z + sg(e - z)); the codebook is learned by loss:

    loss = |x - decode(z_q)|^2 + |sg(z) - e|^2 + beta |z - sg(e)|^2

(reconstruction, codebook, commitment; every term a mean over elements; beta 0.25 as in VQ-VAE;
the codebook initialised as Sonnet's ``VectorQuantizer``: uniform in +-sqrt(3 / code_dim)). With
``vq.l2_norm`` (ViT-VQGAN, Yu et al. 2021) codes and encoder outputs are L2-normalised before the
look-up and the losses (nearest code = highest cosine similarity), which keeps far more of a small
codebook in use; the plain VQ-VAE quantiser collapses to a handful of codes on the digits. The metrics report the codebook's use in the batch: ``code_perplexity`` (exp of the
entropy of code frequencies; the codebook size at uniform use) and ``code_usage`` (share of codes used).

Its checkpoint is a frozen tokenizer for later objectives (``objectives.base.Teacher`` with a
``workdir``): :meth:`VQ.tokens` maps images to code indices, :meth:`VQ.detokenize` back to patches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax.errors import ConfigError
from maskjax.models import layers, vit
from maskjax.objectives import base
from maskjax.objectives.vision import VisionObjective


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared Euclidean) for each vector: z [..., d], codebook
    [K, d] -> [...] int32."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    distances = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, e)
                 + jnp.sum(jnp.square(e), -1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def code_statistics(indices: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, usage) of the codes in ``indices``: exp of the entropy of their frequencies, and the
    share of the ``size`` codes that occur at all."""
    freq = jnp.mean(jax.nn.one_hot(indices.reshape(-1), size, dtype=jnp.float32), axis=0)
    entropy = -jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.where(freq > 0, freq, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((freq > 0).astype(jnp.float32))


class VQModel(nnx.Module):
    """ViT encoder -> codes -> ViT decoder over patch vectors."""

    def __init__(self, encoder: vit.ViTEncoder, decoder: layers.Transformer, *, patch_dim: int, codebook_size: int,
                 code_dim: int, rngs: nnx.Rngs, ema: bool = False):
        self.encoder = encoder
        width, dtype = decoder.width, decoder.dtype
        self.to_code = layers.Dense(encoder.width, code_dim, ("embed", None), rngs=rngs, dtype=dtype)
        # Sonnet's VectorQuantizer: variance scaling over the code dimension, uniform
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=1, out_axis=0)
        shape = (codebook_size, code_dim)
        self.codebook = layers.param(rngs, init, shape, ("vocab", None), "statistic" if ema else "embedding")
        if ema:  # the EMA's statistics: every code starts as if used once, at its initial value
            start = self.codebook[...]
            self.code_counts = layers.param(rngs, lambda *_: jnp.ones(codebook_size), (codebook_size,), ("vocab",),
                                            "statistic")
            self.code_sums = layers.param(rngs, lambda *_: start, shape, ("vocab", None), "statistic")
        self.from_code = layers.Dense(code_dim, width, (None, "embed"), rngs=rngs, dtype=dtype)
        self.blocks = layers.Stack(decoder, rngs=rngs)
        self.norm = layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=decoder.norm_eps)
        self.pred = layers.Dense(width, patch_dim, ("embed", "patch"), rngs=rngs, dtype=dtype)
        self.grid, self.positions, self.width = encoder.grid, encoder.positions, width

    def encode(self, patches: jax.Array) -> jax.Array:
        """[B, L, patch_dim] -> z [B, L, code_dim] float32 (before quantisation)."""
        out = self.encoder(patches)[:, self.encoder.num_prefix:]
        return self.to_code(out).astype(jnp.float32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Code vectors [B, L, code_dim] -> patches [B, L, patch_dim] float32."""
        x = self.from_code(codes)
        x = x + jnp.asarray(vit.position_table(self.positions, self.width, self.grid), x.dtype)[None]
        return self.pred(self.norm(self.blocks(x))).astype(jnp.float32)


@base.register
class VQ(VisionObjective):
    name = "vq"
    config_groups = {"vq": {
        "codebook_size": (512, "Codes in the codebook."),
        "code_dim": (64, "Width of a code vector."),
        "beta": (0.25, "Commitment weight: beta * |z - sg(e)|^2."),
        "l2_norm": (False, "L2-normalise codes and encoder outputs before the look-up (ViT-VQGAN)."),
        "ema": (False, "Learn the codebook by exponential moving averages of the vectors assigned to each code "
                       "(VQ-VAE appendix, Sonnet's VectorQuantizerEMA) instead of the codebook loss."),
        "ema_decay": (0.99, "Decay of the codebook EMA (vq.ema)."),
        "ema_eps": (1e-5, "Laplace smoothing of the EMA's code counts (vq.ema)."),
        "dead_threshold": (0.0, "vq.ema: a code whose EMA count of assignments per step falls below this is "
                                "restarted at a random encoder output of the batch; 0 = never."),
    }}
    papers = {
        "vq": {
            "title": "Neural Discrete Representation Learning (VQ-VAE, van den Oord et al. 2017), the quantiser",
            "official": "deepmind/sonnet (sonnet/src/nets/vqvae.py, examples/vqvae_example.ipynb)",
            "values": {"vq.beta": 0.25, "vq.codebook_size": 512, "vq.code_dim": 64},
        },
        "maskgit_tokens": {
            "title": "MaskGIT's token layout (Chang et al. 2022) with ViT-VQGAN's look-up (Yu et al. 2021), ImageNet 256",
            "official": "google-research/maskgit (configs/vqgan_config.py); ViT-VQGAN paper, Table 1 and Sec. 3.2",
            "values": {"vq.codebook_size": 1024, "data.image_size": 256, "model.patch_size": 16, "vq.beta": 0.25,
                       "vq.l2_norm": True, "vq.code_dim": 32, "model.width": 512, "model.depth": 8},
        },
    }

    def validate(self) -> None:
        super().validate()
        base.check_transformer(self.config.decoder, "decoder", config=self.config)
        q = self.config.vq
        for key in ("codebook_size", "code_dim"):
            if not isinstance(q[key], int) or isinstance(q[key], bool) or q[key] < 2:
                raise ConfigError(f"vq.{key}", f"must be an int >= 2, got {q[key]!r}")
        if q.beta < 0:
            raise ConfigError("vq.beta", f"must be >= 0, got {q.beta}")
        if self.target != "pixels":
            raise ConfigError("loss.target", "a tokenizer reconstructs pixels ('pixels')")
        if not 0.0 < q.ema_decay < 1.0:
            raise ConfigError("vq.ema_decay", f"must be in (0, 1), got {q.ema_decay}")
        if q.dead_threshold < 0 or (q.dead_threshold > 0 and not q.ema):
            raise ConfigError("vq.dead_threshold", f"{q.dead_threshold} must be >= 0, and > 0 only with vq.ema")
        if q.dead_threshold > 0 and self.config.optim.grad_accum != 1:
            raise ConfigError("vq.dead_threshold", "restarts draw encoder outputs of the whole batch: optim.grad_accum "
                                                   "must be 1")

    def build(self, rngs: nnx.Rngs) -> VQModel:
        m, dec, q = self.config.model, self.config.decoder, self.config.vq
        blocks = layers.Transformer.from_model(m, width=dec.width, depth=dec.depth, heads=dec.heads)
        return VQModel(vit.encoder_from_config(self.config, rngs), blocks, patch_dim=self.patch_dim,
                       codebook_size=q.codebook_size, code_dim=q.code_dim, rngs=rngs, ema=q.ema)

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ("probe", "reconstruction")

    @property
    def mask_ratio(self) -> float | None:
        return None

    # ---------------------------------------------------------------- tokenizer
    def _unit(self, x: jax.Array) -> jax.Array:
        """``x`` L2-normalised over its last axis with ``vq.l2_norm``, else unchanged."""
        if not self.config.vq.l2_norm:
            return x
        return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-12)

    def _vectors(self, model: VQModel, patches: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(encoder outputs z [B, L, d], codebook [K, d]) as the look-up compares them."""
        return self._unit(model.encode(patches)), self._unit(model.codebook[...].astype(jnp.float32))

    def tokens(self, model: VQModel, batch: dict) -> jax.Array:
        """Images -> code indices [B, L] int32 (token-grid order)."""
        return nearest_codes(*self._vectors(model, self.patches(batch)))

    def detokenize(self, model: VQModel, indices: jax.Array) -> jax.Array:
        """Code indices [B, L] -> patches [B, L, patch_dim] float32."""
        codebook = self._unit(model.codebook[...].astype(jnp.float32))
        return model.decode(jnp.take(codebook, indices, axis=0))

    # ---------------------------------------------------------------- loss
    def loss(self, model: VQModel, batch: dict, key: jax.Array, step: jax.Array):
        q = self.config.vq
        patches = self.patches(batch)
        z, codebook = self._vectors(model, patches)
        if q.ema:  # learned by after_update, never by gradient
            codebook = jax.lax.stop_gradient(codebook)
        indices = nearest_codes(z, codebook)
        e = jnp.take(codebook, indices, axis=0).astype(jnp.float32)
        quantised = z + jax.lax.stop_gradient(e - z)  # straight-through: d(quantised)/dz = identity
        recon = model.decode(quantised)
        reconstruction = jnp.mean(jnp.square(recon - patches))
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
        commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
        loss = reconstruction + q.beta * commitment + (0.0 if q.ema else codebook_loss)
        perplexity, usage = code_statistics(indices, q.codebook_size)
        metrics = {"loss": loss, "reconstruction_loss": reconstruction, "codebook_loss": codebook_loss,
                   "commitment_loss": commitment, "code_perplexity": perplexity, "code_usage": usage}
        if q.ema:
            flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
            assigned = jax.nn.one_hot(indices.reshape(-1), q.codebook_size, dtype=jnp.float32)
            picks = jax.random.randint(jax.random.fold_in(key, 7), (q.codebook_size,), 0, flat.shape[0])
            metrics[base.STATS] = {"counts": jnp.sum(assigned, 0), "sums": assigned.T @ flat,
                                   "samples": jnp.take(flat, picks, axis=0)}
        return loss, metrics

    def after_update(self, params: dict, stats: dict, key: jax.Array, step: jax.Array) -> dict:
        """The EMA codebook (``vq.ema``): counts and sums of the vectors assigned to each code decay by
        ``vq.ema_decay`` toward the batch's; each code is its sum over its Laplace-smoothed count.
        Codes whose count falls below ``vq.dead_threshold`` restart at a random encoder output of the
        batch (counted once). Without ``vq.ema`` the parameters are unchanged."""
        q = self.config.vq
        if not q.ema:
            return params
        d, k = q.ema_decay, q.codebook_size
        counts = d * params["code_counts"] + (1.0 - d) * stats["counts"]
        sums = d * params["code_sums"] + (1.0 - d) * stats["sums"]
        total = jnp.sum(counts)
        codebook = sums / ((counts + q.ema_eps) / (total + k * q.ema_eps) * total)[:, None]
        if q.dead_threshold > 0:
            dead = (counts < q.dead_threshold)[:, None]
            codebook = jnp.where(dead, stats["samples"], codebook)
            sums = jnp.where(dead, stats["samples"], sums)
            counts = jnp.where(dead[:, 0], 1.0, counts)
        return {**params, "codebook": codebook, "code_counts": counts, "code_sums": sums}

    def reconstruct(self, model: VQModel, batch: dict, key: jax.Array) -> dict:
        """Input images and their reconstruction through the codes."""
        recon = self.detokenize(model, self.tokens(model, batch))
        to_image = lambda x: vit.unpatchify(x, self.image_shape(), self.config.model.patch_size, self.tubelet)
        return {"input": batch["image"], "reconstruction": to_image(recon)}

    def flops(self) -> int:
        m, dec, q, b = self.config.model, self.config.decoder, self.config.vq, self.config.batch_size
        tokens = self.num_tokens
        trained = (self.encoder_flops(tokens) + 2 * b * tokens * (m.width * q.code_dim + q.code_dim * dec.width)
                   + layers.transformer_flops(b, tokens, dec.width, dec.depth, int(dec.width * m.mlp_ratio))
                   + 2 * b * tokens * dec.width * self.patch_dim)
        distances = 2 * b * tokens * q.codebook_size * q.code_dim  # forward only: argmin has no gradient
        return 3 * trained + distances
