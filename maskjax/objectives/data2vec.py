"""data2vec 2.0 for images (Baevski et al. 2022, "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language"), re-derived from fairseq's
``examples/data2vec`` (``models/data2vec2.py``, ``models/modalities/{base,images,modules}.py``,
``fairseq/data/data_utils.py::compute_block_mask_2d``, ``config/v2/base_images_only_task.yaml``).

The student predicts an EMA teacher's *contextualised* features instead of pixels:

* **teacher** (an EMA of the whole encoder: patch embedding, cls token and every block; decay annealed
  linearly from ``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_steps`` updates) encodes each
  unmasked image once. Targets: the MLP outputs (before the residual sum) of its top ``top_k``
  blocks, cls dropped, each instance-normalised over the tokens (per channel, eps 1e-5), averaged,
  then layer-normalised over channels (no affine, eps 1e-5);
* **multi-mask**: each image is repeated ``clone_batch`` times with independent inverse block masks
  (``mask.kind='inverse_block'``), all sharing the one teacher pass;
* the **student** (post-norm blocks after a LayerNorm on the tokens, as fairseq's image encoder
  with ``layer_norm_first`` false) encodes only the visible tokens plus cls;
* a **convolutional decoder** fills the hidden positions with N(0, ``mask_noise_std``^2) noise, puts the
  tokens back on the patch grid and runs ``decoder_layers`` blocks of (grouped ``decoder_kernel`` x
  ``decoder_kernel`` convolution, LayerNorm over channels without affine, GELU, residual), then a linear
  projection back to the encoder width;
* **loss**: per hidden token the squared error summed over channels / sqrt(width), averaged over hidden
  tokens, plus ``cls_weight`` x the same error of the student's cls output against the mean target of
  its image, averaged over rows (see ``cls_weight`` for how that reproduces fairseq's scaling).

The encoder's features (mean over patch tokens) go to the probes like every image objective's.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import masking
from maskjax.errors import ConfigError
from maskjax.models import layers, vit
from maskjax.objectives import base
from maskjax.objectives.vision import VisionObjective

EPS = 1e-5  # torch's instance_norm / layer_norm default, which fairseq's make_targets uses


def instance_norm(x: jax.Array, axis: int) -> jax.Array:
    """Standardise ``x`` along ``axis`` (biased variance, eps 1e-5; torch's ``F.instance_norm`` over time)."""
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS)


def targets(layer_outputs: jax.Array, top_k: int, instance_norm_layers: bool = True,
            layer_norm_targets: bool = True) -> jax.Array:
    """data2vec's targets from per-block outputs [depth, B, L, D] (cls already dropped): the top
    ``top_k`` blocks, each instance-normalised over tokens, averaged, then layer-normalised (float32)."""
    y = layer_outputs[-top_k:].astype(jnp.float32)
    if instance_norm_layers:
        y = instance_norm(y, axis=2)
    y = jnp.mean(y, axis=0)
    return instance_norm(y, axis=-1) if layer_norm_targets else y


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', ('NHWC', 'HWIO', 'NHWC'), feature_group_count=
    groups)`` for odd square kernels, as one batched matmul over the k*k shifted copies of ``x`` (im2col).
    Same values and FLOPs; XLA:CPU runs grouped convolutions (and their gradients) with a slow generic
    loop, 69% of a data2vec digits step (docs/performance.md)."""
    k, _, cin_g, cout = kernel.shape
    n, h, w, _ = x.shape
    pad = k // 2
    # group-major before the k*k copies are made, so the matmul's batch axis leads and nothing the size
    # of the copies is transposed
    grouped = x.reshape(n, h, w, groups, cin_g).transpose(3, 0, 1, 2, 4)
    padded = jnp.pad(grouped, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)))
    shifted = jnp.stack([padded[:, :, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=4)
    weights = kernel.reshape(k * k, cin_g, groups, cout // groups).transpose(2, 0, 1, 3)
    out = jnp.einsum("gnhwkc,gkcd->gnhwd", shifted, weights)
    return out.transpose(1, 2, 3, 0, 4).reshape(n, h, w, cout)


class ConvDecoder(nnx.Module):
    """fairseq's ``Decoder2d``: tokens [N, h*w, width] on the patch grid -> predictions [N, h*w, width]."""

    def __init__(self, width: int, dim: int, groups: int, kernel: int, depth: int, grid: tuple[int, int], *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if width % groups or dim % groups:
            raise ValueError(f"data2vec.decoder_groups={groups} must divide the width {width} and decoder_dim {dim}")
        self.grid, self.dtype, self.width, self.dim = tuple(grid), dtype, width, dim
        # torch's default Conv2d / Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = lambda *batch: nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(-4, -3, -2),
                                                                    out_axis=-1, batch_axis=batch)
        self.first = layers.param(rngs, fan_in(), (kernel, kernel, width // groups, dim), (None,) * 4, "kernel")
        self.first_bias = layers.param(rngs, layers.zeros, (dim,), (None,), "bias")
        rest = depth - 1  # the others are alike: stacked and scanned
        self.rest = layers.param(rngs, fan_in(0), (rest, kernel, kernel, dim // groups, dim), ("layers",) + (None,) * 4,
                                 "kernel")
        self.rest_bias = layers.param(rngs, layers.zeros, (rest, dim), ("layers", None), "bias")
        self.groups = groups
        self.proj = layers.Dense(dim, width, ("embed", "embed"), rngs=rngs, dtype=dtype,
                                 init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))

    def _block(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        y = grouped_conv(x, kernel.astype(self.dtype), self.groups) + bias.astype(self.dtype)
        y = layers.gelu(instance_norm(y.astype(jnp.float32), axis=-1)).astype(self.dtype)
        return y + x if y.shape == x.shape else y  # fairseq's add_residual: only where the shapes agree

    def __call__(self, tokens: jax.Array) -> jax.Array:
        n, _, width = tokens.shape
        x = self._block(tokens.astype(self.dtype).reshape(n, *self.grid, width), self.first[...], self.first_bias[...])
        x, _ = jax.lax.scan(lambda x, p: (self._block(x, *p), None), x, (self.rest[...], self.rest_bias[...]))
        return self.proj(x.reshape(n, -1, self.dim)).astype(jnp.float32)


class Data2VecModel(nnx.Module):
    def __init__(self, encoder: vit.ViTEncoder, decoder: ConvDecoder):
        self.encoder, self.decoder = encoder, decoder


@base.register
class Data2Vec(VisionObjective):
    name = "data2vec"
    config_groups = {"data2vec": {
        "top_k": (10, "Teacher blocks whose outputs are averaged into the targets (the top ones)."),
        "clone_batch": (16, "Masks per image (multi-mask): each image is encoded by the teacher once."),
        "ema_decay": (0.9998, "Teacher EMA decay at step 0."),
        "ema_end_decay": (0.99999, "Teacher EMA decay from ema_anneal_steps on (linear in between)."),
        "ema_anneal_steps": (100_000, "Updates over which the EMA decay goes from ema_decay to ema_end_decay."),
        "instance_norm_layers": (True, "Instance-normalise each teacher block's output over tokens before averaging."),
        "layer_norm_targets": (True, "Layer-normalise the averaged targets over channels."),
        "cls_weight": (2.56, "Weight of the cls loss (its error against the mean target) averaged over rows: fairseq's "
                             "cls_loss 0.01 times the rows one GPU sums it over (16 images x 16 masks), since "
                             "fairseq sums the term per GPU and divides by hidden tokens like the main loss."),
        "mask_noise_std": (0.01, "Std of the Gaussian noise the decoder gets at hidden positions."),
        "decoder_dim": (768, "Channels of the convolutional decoder."),
        "decoder_groups": (16, "Groups of each decoder convolution."),
        "decoder_kernel": (3, "Kernel size of each decoder convolution."),
        "decoder_layers": (6, "Decoder blocks (conv, LayerNorm, GELU, residual)."),
    }}
    papers = {
        "data2vec2": {
            "title": "Efficient Self-supervised Learning with Contextualized Target Representations for Vision, "
                     "Speech and Language (data2vec 2.0, Baevski et al. 2022), ViT-B/16 images",
            "official": "facebookresearch/fairseq (examples/data2vec/config/v2/base_images_only_task.yaml, "
                        "models/data2vec2.py, models/modalities/images.py, data/mae_image_dataset.py)",
            "values": {"batch_size": 256, "total_steps": 375_300, "optim.warmup_steps": 50_040, "optim.base_lr": 1e-3,
                       "optim.base_batch": 256, "optim.b1": 0.9, "optim.b2": 0.95, "optim.weight_decay": 0.05,
                       "optim.clip_norm": 4.0, "optim.schedule": "cosine", "optim.decay_roles": ("kernel", "token"),
                       "data.image_size": 224, "data.crop_scale": (0.2, 1.0), "data.flip": True,
                       "model.patch_size": 16, "model.width": 768, "model.depth": 12, "model.heads": 12,
                       "model.qkv_bias": True, "model.pre_norm": False, "model.norm_eps": 1e-6, "model.cls_token": True,
                       "mask.kind": "inverse_block", "mask.ratio": 0.8, "mask.block_length": 3,
                       "mask.block_adjust": 0.07,
                       "data2vec.top_k": 10, "data2vec.clone_batch": 16, "data2vec.ema_decay": 0.9998,
                       "data2vec.ema_end_decay": 0.99999, "data2vec.ema_anneal_steps": 100_000,
                       "data2vec.cls_weight": 2.56, "data2vec.decoder_dim": 768, "data2vec.decoder_groups": 16,
                       "data2vec.decoder_kernel": 3, "data2vec.decoder_layers": 6, "data2vec.mask_noise_std": 0.01},
        },
    }

    # ---------------------------------------------------------------- config
    def validate(self) -> None:
        super().validate()
        d, m = self.config.data2vec, self.config.model
        if not m.cls_token:
            raise ConfigError("model.cls_token", "data2vec's cls loss needs the cls token (model.cls_token=True)")
        if self.frames:
            raise ConfigError("data.frames", "data2vec here is for images (data.frames=0)")
        for key in ("top_k", "clone_batch", "ema_anneal_steps", "decoder_dim", "decoder_groups", "decoder_kernel",
                    "decoder_layers"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
                raise ConfigError(f"data2vec.{key}", f"must be a positive int, got {d[key]!r}")
        if d.top_k > m.depth:
            raise ConfigError("data2vec.top_k", f"{d.top_k} is more than the teacher's model.depth={m.depth} blocks")
        for key in ("ema_decay", "ema_end_decay"):
            if not 0.0 <= d[key] <= 1.0:
                raise ConfigError(f"data2vec.{key}", f"must be in [0, 1], got {d[key]}")
        if m.width % d.decoder_groups or d.decoder_dim % d.decoder_groups:
            raise ConfigError("data2vec.decoder_groups", f"{d.decoder_groups} must divide model.width={m.width} and "
                                                         f"data2vec.decoder_dim={d.decoder_dim}")
        if d.decoder_kernel % 2 == 0:
            raise ConfigError("data2vec.decoder_kernel",
                              f"must be odd (same-size convolutions), got {d.decoder_kernel}")
        if d.cls_weight < 0 or d.mask_noise_std < 0:
            raise ConfigError("data2vec.cls_weight" if d.cls_weight < 0 else "data2vec.mask_noise_std",
                              "must be >= 0")

    # ---------------------------------------------------------------- model
    def encoder(self, rngs: nnx.Rngs) -> vit.ViTEncoder:
        return vit.encoder_from_config(self.config, rngs)

    def build(self, rngs: nnx.Rngs) -> Data2VecModel:
        d, m = self.config.data2vec, self.config.model
        _, h, w = self.token_grid
        decoder = ConvDecoder(m.width, d.decoder_dim, d.decoder_groups, d.decoder_kernel, d.decoder_layers, (h, w),
                              rngs=rngs, dtype=layers.compute_dtype(m.dtype))
        return Data2VecModel(self.encoder(rngs), decoder)

    def teacher(self) -> base.Teacher:
        d = self.config.data2vec
        return base.Teacher(build=self.encoder, follows=("encoder",),
                            rate=base.ema_rate(d.ema_decay, d.ema_end_decay, d.ema_anneal_steps))

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ("probe",)

    @property
    def clones(self) -> int:
        return self.config.data2vec.clone_batch

    # ---------------------------------------------------------------- forward and loss
    def teacher_targets(self, teacher: vit.ViTEncoder, patches: jax.Array) -> jax.Array:
        """[B, L, width] float32 targets of whole images, without gradient."""
        d = self.config.data2vec
        _, outputs = teacher.run(teacher.embed(patches), collect=True)
        y = targets(outputs[:, :, teacher.num_prefix:], d.top_k, d.instance_norm_layers, d.layer_norm_targets)
        return jax.lax.stop_gradient(y)

    def clone_keys(self, key: jax.Array, batch: dict) -> jax.Array:
        """[B * clone_batch] keys: clone m of example b is row b * clone_batch + m (torch's repeat_interleave)."""
        keys = base.example_keys(key, batch)
        m = jnp.arange(self.clones)
        return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(m))(keys).reshape(-1)

    def student(self, model: Data2VecModel, patches: jax.Array, keys: jax.Array):
        """(cls outputs [B*M, width], predictions [B*M, L, width] float32, mask) for ``keys`` [B*M]."""
        mask_keys, noise_keys = masking.split_rows(keys)
        mask = self.draw_mask(mask_keys)
        enc = model.encoder
        tokens = jnp.repeat(enc.embed(patches), self.clones, axis=0)  # embed once, then clone
        x = enc.run(layers.gather_tokens(tokens, mask.keep_idx, enc.one_hot_gather))
        visible = x[:, enc.num_prefix:]
        hidden = self.num_tokens - mask.num_kept
        std = self.config.data2vec.mask_noise_std
        noise = jax.vmap(lambda k: jax.random.normal(k, (hidden, enc.width)))(noise_keys) * std
        grid = layers.gather_tokens(jnp.concatenate([visible, noise.astype(visible.dtype)], axis=1), mask.restore_idx)
        return x[:, 0].astype(jnp.float32), model.decoder(grid), mask

    def loss(self, model: Data2VecModel, batch: dict, key: jax.Array, step: jax.Array, teacher: vit.ViTEncoder):
        d = self.config.data2vec
        patches = self.patches(batch)
        y = self.teacher_targets(teacher, patches)  # once per image, shared by its masks
        cls, pred, mask = self.student(model, patches, self.clone_keys(key, batch))
        scale = 1.0 / math.sqrt(y.shape[-1])
        target = jnp.repeat(y, self.clones, axis=0)
        per_token = jnp.sum(jnp.square(pred - target), axis=-1) * scale
        weight = mask.mask.astype(jnp.float32)
        regression = jnp.sum(per_token * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        cls_target = jnp.repeat(jnp.mean(y, axis=1), self.clones, axis=0)
        cls_loss = jnp.mean(jnp.sum(jnp.square(cls - cls_target), axis=-1)) * scale
        loss = regression + d.cls_weight * cls_loss
        metrics = {"loss": loss, "regression_loss": regression, "cls_loss": cls_loss,
                   "mask_ratio": jnp.mean(weight),
                   # fairseq's collapse monitors: the mean over channels of each channel's std over the
                   # scored (hidden) tokens
                   "target_var": _spread(target, weight), "pred_var": _spread(pred, weight)}
        return loss, metrics

    # ---------------------------------------------------------------- accounting
    @property
    def tokens_per_example(self) -> int:
        return self.num_tokens

    def flops(self) -> int:
        m, d, b = self.config.model, self.config.data2vec, self.config.batch_size
        rows, tokens, width = b * self.clones, self.num_tokens, m.width
        mlp = int(width * m.mlp_ratio)
        embed = 2 * b * tokens * self.patch_dim * width
        teacher = embed + layers.transformer_flops(b, tokens + 1, width, m.depth, mlp)
        student = embed + layers.transformer_flops(rows, self.num_kept + 1, width, m.depth, mlp)
        k2 = d.decoder_kernel ** 2
        convs = (width + (d.decoder_layers - 1) * d.decoder_dim) * d.decoder_dim // d.decoder_groups
        decoder = 2 * rows * tokens * (k2 * convs + d.decoder_dim * width)
        ema = 3 * sum(int(math.prod(x.shape)) for x in jax.tree.leaves(
            nnx.state(nnx.eval_shape(lambda: self.encoder(nnx.Rngs(0))))))
        return 3 * (student + decoder) + teacher + ema


def _spread(x: jax.Array, weight: jax.Array) -> jax.Array:
    """mean over channels of sqrt(var + 1e-6), the unbiased variance over the tokens where ``weight``
    [B, L] is 1 (fairseq's ``compute_var`` on ``x[mask]``). x [B, L, D]."""
    x, w = x.astype(jnp.float32).reshape(-1, x.shape[-1]), weight.reshape(-1, 1)
    n = jnp.sum(w)
    mean = jnp.sum(x * w, axis=0) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * w, axis=0) / jnp.maximum(n - 1.0, 1.0)
    return jnp.mean(jnp.sqrt(var + 1e-6))

