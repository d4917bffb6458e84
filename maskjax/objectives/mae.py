"""MAE (He et al. 2021): the encoder sees only the visible patches; a light decoder fills in mask
tokens, unshuffles with ``restore_idx`` and predicts the targets; MSE on the masked patches only.

The same code trains video MAE (VideoMAE / MAE-ST): ``data.frames > 0`` gives 3D tubelets and
``mask.kind`` 'tube' or 'spatiotemporal' picks the video masking. Options:

* ``loss.target='hog'``: MaskFeat's HOG features instead of pixels;
* ``loss.target='teacher'``: feature distillation (MILAN / dBOT): the decoder regresses a frozen
  teacher's features at the hidden positions, layer-normalised per token (no affine), MSE. The teacher
  is the encoder of the run in ``teacher.workdir`` (checkpoint ``teacher.step``), or, without one, an
  encoder of this run's architecture frozen at a random initialisation (dBOT's first stage);
* ``mask.decoder_ratio > 0``: VideoMAE V2 dual masking, the decoder sees the visible tokens plus
  mask tokens only where a running-cell decoder mask keeps them, and the loss is on tokens masked
  for the encoder and kept for the decoder;
* ``hpm.enabled``: hard-patch mining (Wang et al. 2023): a head predicts each patch's loss, and a
  share of the mask growing linearly to ``hpm.final_share`` is taken from the predicted-hardest patches.

The two variants are parts, not branches of the loss: a :class:`Masks` (how the encoder's mask is drawn,
and any loss term that comes with it: :class:`HardPatches`) and a :class:`Decoding` (which positions the
decoder predicts: :class:`DualDecoding`). The loss is the same few lines for every combination, and a new
variant is one more part.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import masking, storage
from maskjax.objectives import base
from maskjax.errors import ConfigError
from maskjax.models import hf_layout as hf
from maskjax.models import layers, vit
from maskjax.objectives import vision
from maskjax.objectives.vision import VisionObjective

IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k train: epochs -> steps


def masked_mse(pred: jax.Array, target: jax.Array, hidden: jax.Array) -> jax.Array:
    """Mean over hidden patches of the per-patch MSE. pred, target [B, L, P]; hidden [B, L] bool.
    Visible patches contribute nothing, to the value or to the gradient."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weight = hidden.astype(jnp.float32)
    return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def pairwise_rank_loss(pred: jax.Array, actual: jax.Array, valid: jax.Array) -> jax.Array:
    """HPM's relative loss-prediction objective: for every pair (i, j) of valid patches, binary
    cross-entropy of ``sigmoid(pred_i - pred_j)`` against ``actual_i > actual_j``. [B, L] inputs."""
    logits = pred[:, :, None] - pred[:, None, :]
    labels = (actual[:, :, None] > actual[:, None, :]).astype(jnp.float32)
    pairs = (valid[:, :, None] & valid[:, None, :]) & ~jnp.eye(pred.shape[1], dtype=bool)[None]
    bce = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    weight = pairs.astype(jnp.float32)
    return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class MAEDecoder(nnx.Module):
    """Encoder latents -> hidden states at the decoded positions; ``pred`` maps them to targets and
    the optional ``loss_pred`` (HPM) to a predicted reconstruction loss."""

    def __init__(self, t: layers.Transformer, encoder: vit.ViTEncoder, *, target_dim: int,
                 predict_loss: bool = False, embed_bias: bool = True, rngs: nnx.Rngs):
        """``t``: the decoder's blocks; ``encoder``: the encoder it decodes (its width, token grid, kind of
        positions, prefix tokens and gather are read, not kept); ``embed_bias``: False is VideoMAE's
        ``encoder_to_decoder`` (no bias)."""
        self.dtype, width = t.dtype, t.width
        self.grid, self.width, self.num_prefix = encoder.grid, width, encoder.num_prefix
        self.positions = encoder.positions
        self.embed = layers.Dense(encoder.width, width, ("embed", "embed"), rngs=rngs, dtype=self.dtype,
                                  use_bias=embed_bias)
        self.mask_token = layers.param(rngs, nnx.initializers.normal(0.02), (1, 1, width), (None, None, "embed"), "token")
        self.blocks = layers.Stack(t, rngs=rngs)
        self.norm = layers.LayerNorm(width, rngs=rngs, dtype=self.dtype, eps=t.norm_eps)
        self.pred = layers.Dense(width, target_dim, ("embed", "patch"), rngs=rngs, dtype=self.dtype)
        self.loss_pred = layers.Dense(width, 1, ("embed", None), rngs=rngs, dtype=self.dtype) if predict_loss else None
        self.one_hot_gather = encoder.one_hot_gather

    def _positions(self) -> jax.Array:
        return jnp.asarray(vit.position_table(self.positions, self.width, self.grid), self.dtype)

    def __call__(self, latent: jax.Array, restore_idx: jax.Array) -> jax.Array:
        """latent [B, prefix + K, enc_width], restore_idx [B, L] -> hidden [B, L, width], grid order."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        batch, length = restore_idx.shape
        fill = jnp.broadcast_to(self.mask_token[...].astype(self.dtype), (batch, length - visible.shape[1], self.width))
        tokens = layers.gather_tokens(jnp.concatenate([visible, fill], axis=1), restore_idx, self.one_hot_gather)
        tokens = tokens + self._positions()[None]
        x = self.norm(self.blocks(jnp.concatenate([prefix, tokens], axis=1)))
        return x[:, self.num_prefix:]

    def partial(self, latent: jax.Array, keep_idx: jax.Array, query_idx: jax.Array, query_valid: jax.Array
                ) -> jax.Array:
        """Dual masking: the visible tokens (at ``keep_idx`` [B, K]) plus mask tokens at ``query_idx``
        [B, Q] only; invalid queries (``query_valid`` False) are hidden from attention. -> [B, Q, width]."""
        pos = self._positions()
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        visible = visible + jnp.take(pos, keep_idx, axis=0)
        queries = self.mask_token[...].astype(self.dtype) + jnp.take(pos, query_idx, axis=0)
        known = jnp.ones((x.shape[0], x.shape[1]), bool)
        tokens = jnp.concatenate([prefix, visible, queries], axis=1)
        attend = layers.Segments.keys(jnp.concatenate([known, query_valid], axis=1), tokens.shape[1])
        x = self.norm(self.blocks(tokens, attend))
        return x[:, -query_idx.shape[1]:]


class MAEModel(nnx.Module):
    def __init__(self, encoder: vit.ViTEncoder, decoder: MAEDecoder):
        self.encoder, self.decoder = encoder, decoder


# --------------------------------------------------------------------------- transformers' VideoMAE


def _videomae_groups(objective) -> list:
    bias = ("query", "value") if objective.config.model.qkv_bias else False
    emb = "videomae.embeddings.patch_embeddings.projection"
    encoder = [hf.Rule(f"{emb}.weight", "encoder/patch_embed/kernel", "tubelet_conv"),
               hf.Rule(f"{emb}.bias", "encoder/patch_embed/bias"),
               *hf.block_rules("videomae.encoder.layer.{i}.", "encoder/blocks/blocks/", hf.VIT_BLOCK, bias),
               *hf.norm("videomae.layernorm", "encoder/norm")]
    decoder = [hf.Rule("encoder_to_decoder.weight", "decoder/embed/kernel", "linear"),
               hf.Rule("mask_token", "decoder/mask_token"),
               *hf.block_rules("decoder.decoder_layers.{i}.", "decoder/blocks/blocks/", hf.VIT_BLOCK, bias),
               *hf.norm("decoder.norm", "decoder/norm"), *hf.linear("decoder.head", "decoder/pred")]
    return [hf.Group("video encoder", encoder), hf.Group("VideoMAE decoder", decoder)]


def _videomae_config(objective) -> dict:
    c = objective.config
    m, dec = c.model, c.decoder
    return dict(model_type="videomae", image_size=c.data.image_size, patch_size=m.patch_size,
                num_channels=c.data.channels, num_frames=c.data.frames, tubelet_size=m.tubelet, qv_bias=m.qkv_bias,
                use_mean_pooling=False, norm_pix_loss=bool(c.loss.norm_pix), decoder_hidden_size=dec.width,
                decoder_num_hidden_layers=dec.depth, decoder_num_attention_heads=dec.heads,
                decoder_intermediate_size=int(dec.width * m.mlp_ratio))


def _videomae_check(objective) -> None:
    """Only a run laid out as VideoMAE (MCG-NJU/VideoMAE ``modeling_pretrain.py``) has its weights."""
    c = objective.config
    needs = [("data.frames", bool(c.data.frames), "0: VideoMAEForPreTraining is a video model; use --arch vit_mae"),
             ("model.pos_embed", c.model.pos_embed == "sincos_1d", f"{c.model.pos_embed!r}: VideoMAE's positions "
                                                                   "are 'sincos_1d'"),
             ("model.cls_token", not c.model.cls_token, "True: VideoMAE has no cls token"),
             ("decoder.embed_bias", not c.decoder.embed_bias, "True: VideoMAE's encoder_to_decoder has no bias"),
             ("loss.target", c.loss.target == "pixels", f"{c.loss.target!r}: VideoMAE predicts pixels"),
             ("hpm.enabled", not c.hpm.enabled, "True: the loss-prediction head has no VideoMAE equivalent"),
             ("loss.norm_pix_mode", not c.loss.norm_pix or c.loss.norm_pix_mode == "channel",
              f"{c.loss.norm_pix_mode!r}: VideoMAE normalises each channel of a tubelet ('channel')")]
    for key, ok, why in needs:
        if not ok:
            raise ConfigError(key, why)


VIDEOMAE = base.HFArch(cls="VideoMAEForPreTraining", groups=_videomae_groups, config=_videomae_config,
                       check=_videomae_check)


@base.register
class MAE(VisionObjective):
    name = "mae"
    config_groups = {
        "teacher": {
            "workdir": ("", "loss.target=teacher: the run whose encoder is the frozen teacher ('': a random "
                            "encoder of this run's architecture, dBOT's first stage)."),
            "step": (0, "Checkpoint of teacher.workdir to load (0: the newest)."),
        },
        "hpm": {
            "enabled": (False, "Hard-patch mining (MAE): a head predicts patch losses; part of the mask takes "
                               "the hardest."),
            "final_share": (0.5, "Share of the mask chosen from the predicted-hardest patches at the end of "
                                 "training (rising from 0)."),
            "weight": (1.0, "Weight of the loss-prediction term."),
        },
    }
    papers = {
        "mae": {
            "title": "Masked Autoencoders Are Scalable Vision Learners (He et al. 2021), ViT-B/16, 800 epochs",
            "official": "facebookresearch/mae (models_mae.py, main_pretrain.py)",
            "values": {"batch_size": 4096, "total_steps": math.ceil(800 * IMAGENET_TRAIN / 4096),
                       "optim.warmup_steps": math.ceil(40 * IMAGENET_TRAIN / 4096), "optim.base_lr": 1.5e-4,
                       "optim.base_batch": 256, "optim.b1": 0.9, "optim.b2": 0.95, "optim.weight_decay": 0.05,
                       "optim.decay_roles": ("kernel",), "optim.schedule": "cosine", "data.image_size": 224, "data.crop_scale": (0.2, 1.0),
                       "data.flip": True, "model.patch_size": 16, "model.width": 768, "model.depth": 12,
                       "model.heads": 12, "model.qkv_bias": True, "model.cls_token": True, "mask.kind": "random",
                       "mask.ratio": 0.75, "loss.norm_pix": True, "decoder.width": 512, "decoder.depth": 8,
                       "decoder.heads": 16},
        },
        "videomae": {
            "title": "VideoMAE: Masked Autoencoders are Data-Efficient Learners (Tong et al. 2022), ViT-B on K400",
            "official": "MCG-NJU/VideoMAE (masking_generator.py, modeling_pretrain.py, run_mae_pretraining.py, "
                        "optim_factory.py, utils.py::cosine_scheduler)",
            "values": {"data.frames": 16, "model.tubelet": 2, "model.patch_size": 16, "data.image_size": 224,
                       "model.width": 768, "model.depth": 12, "mask.kind": "tube", "mask.ratio": 0.9,
                       "decoder.width": 384, "decoder.depth": 4, "optim.base_lr": 1.5e-4, "optim.base_batch": 256,
                       "optim.b1": 0.9, "optim.b2": 0.95, "loss.norm_pix": True, "loss.norm_pix_mode": "channel",
                       "model.cls_token": False, "model.qkv_bias": True, "model.pos_embed": "sincos_1d",
                       "decoder.embed_bias": False, "optim.weight_decay": 0.05, "optim.eps": 1e-8,
                       "optim.min_lr_ratio": 1e-5 / 1.5e-4, "optim.warmup_linspace": True,
                       "optim.decay_roles": ("kernel",)},
        },
    }
    interop = base.Interop(archs=("vit_mae", "vit", "videomae"), encoder="encoder", own={"videomae": VIDEOMAE})
    peer = True

    def __init__(self, config):
        super().__init__(config)
        self.masks = HardPatches(self) if config.hpm.enabled else Masks(self)
        self.decoding = DualDecoding(self) if config.mask.decoder_ratio > 0 else Decoding(self)

    def validate(self) -> None:
        super().validate()
        base.check_transformer(self.config.decoder, "decoder", config=self.config)
        self.masks.validate()
        self.decoding.validate()
        t = self.config.teacher
        if not isinstance(t.step, int) or isinstance(t.step, bool) or t.step < 0:
            raise ConfigError("teacher.step", f"must be an int >= 0 (0: the newest checkpoint), got {t.step!r}")
        if self.target == "teacher":
            saved = self.teacher_config()
            try:
                grid = vit.token_grid(saved.data.image_size, saved.model.patch_size, saved.data.get("frames", 0),
                                      saved.model.tubelet)
            except (ValueError, AttributeError) as err:
                raise ConfigError("teacher.workdir", f"{t.workdir!r} is not a run of a ViT encoder: {err}") from None
            if grid != self.token_grid:
                raise ConfigError("teacher.workdir", f"{t.workdir!r} encodes a {grid} token grid, this run {self.token_grid}: "
                                                     "the teacher must see the student's patches")

    target_kinds = vision.TARGETS + ("teacher",)

    def teacher_config(self):
        """The config the frozen teacher's encoder is built from: the saved run's, or this run's."""
        workdir = self.config.teacher.workdir
        if self.target != "teacher" or not workdir:
            return self.config
        if getattr(self, "_teacher_config", None) is None:
            path = storage.join(workdir, "config.json")
            try:
                self._teacher_config = base.from_saved(json.loads(storage.read_text(path)))
            except (OSError, ValueError) as err:
                raise ConfigError("teacher.workdir", f"{path}: not a readable maskjax run config "
                                                     f"({type(err).__name__}: {err})") from None
        return self._teacher_config

    def teacher(self) -> base.Teacher | None:
        if self.target != "teacher":
            return None
        t = self.config.teacher
        return base.Teacher(build=lambda rngs: vit.encoder_from_config(self.teacher_config(), rngs),
                            workdir=t.workdir or None, step=t.step, path=("encoder",))

    @property
    def target_dim(self) -> int:
        return self.teacher_config().model.width if self.target == "teacher" else super().target_dim

    def teacher_targets(self, teacher: vit.ViTEncoder, patches: jax.Array) -> jax.Array:
        """[B, L, teacher width]: the frozen teacher's output at every patch token, layer-normalised."""
        out = teacher(patches)[:, teacher.num_prefix:].astype(jnp.float32)
        mean = jnp.mean(out, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(out - mean), axis=-1, keepdims=True)
        return jax.lax.stop_gradient((out - mean) * jax.lax.rsqrt(var + 1e-6))

    def build(self, rngs: nnx.Rngs) -> MAEModel:
        m, dec = self.config.model, self.config.decoder
        encoder = vit.encoder_from_config(self.config, rngs)
        blocks = layers.Transformer.from_model(m, width=dec.width, depth=dec.depth, heads=dec.heads)
        decoder = MAEDecoder(blocks, encoder, target_dim=self.target_dim, predict_loss=self.masks.predicts_loss,
                             embed_bias=dec.embed_bias, rngs=rngs)
        return MAEModel(encoder, decoder)

    # ---------------------------------------------------------------- forward and loss
    def decode(self, model: MAEModel, patches: jax.Array, mask: masking.Mask):
        """(hidden [B, L, width], predictions [B, L, target_dim] float32) of every position, grid order."""
        hidden = model.decoder(model.encoder(patches, mask.keep_idx), mask.restore_idx)
        return hidden, model.decoder.pred(hidden).astype(jnp.float32)

    def loss(self, model: MAEModel, batch: dict, key: jax.Array, step: jax.Array, teacher=None):
        mask_keys, decoder_keys = masking.split_rows(base.example_keys(key, batch))
        patches = self.patches(batch)
        mask = self.masks.draw(model, patches, mask_keys, step)
        return self.masked_loss(model, batch, patches, mask, step, decoder_keys, teacher)

    def masked_loss(self, model: MAEModel, batch: dict, patches: jax.Array, mask: masking.Mask, step=0,
                    decoder_keys: jax.Array | None = None, teacher=None):
        """The loss given the encoder's mask: MSE of the predictions where the decoding scores them (the
        hidden patches, or those the dual decoder also keeps), plus the mask part's own term. ``teacher``:
        the frozen teacher encoder (``loss.target='teacher'``)."""
        out = self.decoding.decode(model, patches, mask, decoder_keys)
        if self.target == "teacher":
            target = self.teacher_targets(teacher, patches)
        else:
            target = self.targets(batch, patches, self.config.loss.norm_pix)
        if out.positions is not None:
            target = jnp.take_along_axis(target, out.positions[..., None], axis=1)
        loss = masked_mse(out.pred, target, out.scored)
        metrics = {"mask_ratio": jnp.mean(mask.mask.astype(jnp.float32)), **out.metrics}
        extra, more = self.masks.terms(model, out, target, step)
        if more:
            metrics.update(reconstruction_loss=loss, **more)
            loss = loss + extra
        metrics["loss"] = loss
        return loss, metrics

    def reconstruct(self, model: MAEModel, batch: dict, key: jax.Array) -> dict:
        """Images for a person: input, masked input (hidden patches grey), reconstruction with the
        visible patches pasted back. In the normalised pixel space of ``batch['image']``. The decoder
        predicts every position here, also when it was trained with dual masking."""
        patches = self.patches(batch)
        mask = self.masks.draw(model, patches, base.example_keys(key, batch), self.config.total_steps)
        _, pred = self.decode(model, patches, mask)
        if self.config.loss.norm_pix:  # undo the standardisation with the true statistics
            pred = vision.denorm_pix(pred, patches, self.config.data.channels, self.norm_pix_mode)
        return self.reconstruction_images(batch, patches, mask.mask, pred)

    def flops(self) -> int:
        teacher = 0
        if self.target == "teacher":  # one forward pass over every token of every image
            t, b = self.teacher_config().model, self.config.batch_size
            teacher = (2 * b * self.num_tokens * self.patch_dim * t.width
                       + layers.transformer_flops(b, self.num_tokens + (1 if t.cls_token else 0), t.width, t.depth,
                                                  int(t.width * t.mlp_ratio)))
        return 3 * (self.encoder_flops(self.num_kept) + self.decoding.flops()) + self.masks.flops() + teacher

    def decoder_flops(self, visible: int, tokens: int, predicted: int) -> int:
        """Forward FLOPs of the decoder: embedding ``visible`` latents, blocks over ``tokens``, the head on
        ``predicted`` positions."""
        m, dec, b = self.config.model, self.config.decoder, self.config.batch_size
        prefix = 1 if m.cls_token else 0
        return (2 * b * (visible + prefix) * m.width * dec.width
                + layers.transformer_flops(b, tokens + prefix, dec.width, dec.depth, int(dec.width * m.mlp_ratio))
                + 2 * b * predicted * dec.width * self.target_dim)


# --------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True)
class Decoded:
    """What a decoding predicts: ``hidden`` [B, Q, width] and ``pred`` [B, Q, target_dim] (float32) at
    ``positions`` [B, Q] of the token grid (None: every position, in grid order), scored where
    ``scored`` [B, Q] is True; ``metrics`` it reports."""

    hidden: jax.Array
    pred: jax.Array
    positions: jax.Array | None
    scored: jax.Array
    metrics: dict


class Masks:
    """MAE's own masks: the configured mask kind, drawn per example; no loss term of its own."""

    predicts_loss = False  # the decoder needs HPM's loss-prediction head

    def __init__(self, mae: MAE):
        self.mae = mae

    def validate(self) -> None:
        pass

    def draw(self, model: MAEModel, patches: jax.Array, keys: jax.Array, step) -> masking.Mask:
        """The encoder's mask of each example from its key (``keys`` [batch])."""
        return self.mae.draw_mask(keys)

    def terms(self, model: MAEModel, out: Decoded, target: jax.Array, step) -> tuple[jax.Array, dict]:
        """(extra loss, its metrics) given what the decoder predicted; ``{}``: no term."""
        return jnp.zeros(()), {}

    def flops(self) -> int:
        """Training FLOPs this part adds to the step."""
        return 0


class HardPatches(Masks):
    """HPM (Wang et al. 2023): the decoder also predicts each patch's reconstruction loss (a pairwise
    ranking loss against the actual losses), and a share of the mask growing linearly from 0 to
    ``hpm.final_share`` is taken from the patches it predicts hardest (a no-gradient pass over the
    whole image); the rest is drawn uniformly."""

    predicts_loss = True

    def validate(self) -> None:
        share = self.mae.config.hpm.final_share
        if not 0.0 <= share <= 1.0:
            raise ConfigError("hpm.final_share", f"must be in [0, 1], got {share}")

    def hard_count(self, step) -> jax.Array:
        """Hidden patches taken from the predicted-hardest: ``round(share(step) * masked)``."""
        mae = self.mae
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / mae.config.total_steps, 0.0, 1.0)
        masked = mae.num_tokens - mae.num_kept
        return jnp.round(mae.config.hpm.final_share * frac * masked).astype(jnp.int32)

    def predicted_difficulty(self, model: MAEModel, patches: jax.Array) -> jax.Array:
        """The loss predictor on the whole image (every patch visible), without gradient: [B, L]."""
        batch, length = patches.shape[:2]
        everything = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        hidden = model.decoder(model.encoder(patches, everything), everything)
        return jax.lax.stop_gradient(model.decoder.loss_pred(hidden)[..., 0].astype(jnp.float32))

    def draw(self, model: MAEModel, patches: jax.Array, keys: jax.Array, step) -> masking.Mask:
        scores = self.predicted_difficulty(model, patches)
        masked, hard = self.mae.num_tokens - self.mae.num_kept, self.hard_count(step)
        return masking.per_row(lambda k, s: masking.hard_patch_mask(k, s, masked, hard), keys, scores)

    def terms(self, model: MAEModel, out: Decoded, target: jax.Array, step) -> tuple[jax.Array, dict]:
        actual = jax.lax.stop_gradient(jnp.mean(jnp.square(out.pred - target), axis=-1))
        predicted = model.decoder.loss_pred(out.hidden)[..., 0].astype(jnp.float32)
        rank_loss = pairwise_rank_loss(predicted, actual, out.scored)
        return self.mae.config.hpm.weight * rank_loss, {
            "loss_prediction": rank_loss, "hard_count": self.hard_count(step).astype(jnp.float32)}

    def flops(self) -> int:
        mae, length = self.mae, self.mae.num_tokens
        return mae.encoder_flops(length) + mae.decoder_flops(length, length, length)


class Decoding:
    """MAE's decoding: mask tokens at every hidden position, every position predicted, the hidden ones
    scored."""

    def __init__(self, mae: MAE):
        self.mae = mae

    def validate(self) -> None:
        pass

    def decode(self, model: MAEModel, patches: jax.Array, mask: masking.Mask, keys: jax.Array | None) -> Decoded:
        hidden, pred = self.mae.decode(model, patches, mask)
        return Decoded(hidden, pred, None, mask.mask, {})

    def flops(self) -> int:
        """Forward FLOPs of the decoder (3x is the training cost)."""
        mae = self.mae
        return mae.decoder_flops(mae.num_kept, mae.num_tokens, mae.num_tokens)


class DualDecoding(Decoding):
    """VideoMAE V2 dual masking: the decoder sees the visible tokens plus mask tokens only where a
    running-cell decoder mask (``mask.decoder_ratio``, drawn per example) keeps them, and scores the
    tokens masked for the encoder and kept for the decoder."""

    def masker(self):
        t, h, w = self.mae.token_grid
        ratio = self.mae.config.mask.decoder_ratio
        fn = lambda key, batch: masking.running_cell_mask(key, batch, t, (h, w), ratio)
        jax.eval_shape(lambda k: fn(k, 1), jax.random.key(0))
        return fn

    def validate(self) -> None:
        try:
            self.masker()
        except ValueError as err:
            raise ConfigError("mask.decoder_ratio", str(err)) from None

    @property
    def num_queries(self) -> int:
        return jax.eval_shape(lambda k: self.masker()(k, 1), jax.random.key(0)).keep_idx.shape[1]

    def decode(self, model: MAEModel, patches: jax.Array, mask: masking.Mask, keys: jax.Array | None) -> Decoded:
        query_idx = masking.per_example(self.masker(), keys).keep_idx
        scored = jnp.take_along_axis(mask.mask, query_idx, axis=1)  # encoder-masked and decoder-kept
        latent = model.encoder(patches, mask.keep_idx)
        hidden = model.decoder.partial(latent, mask.keep_idx, query_idx, scored)
        pred = model.decoder.pred(hidden).astype(jnp.float32)
        decoded = jnp.mean(scored.astype(jnp.float32)) * query_idx.shape[1] / self.mae.num_tokens
        return Decoded(hidden, pred, query_idx, scored, {"decoded_ratio": decoded})

    def flops(self) -> int:
        # the decoder runs on the visible tokens + its queries; the head on the queries only
        mae, queries = self.mae, self.num_queries
        return mae.decoder_flops(mae.num_kept, mae.num_kept + queries, queries)
