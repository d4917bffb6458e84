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
* ``hpm.enabled``: hard-patch mining (Wang et al. 2023) as the official code does it: a loss-predictor
  branch of its own (decoder blocks, norm and head beside the reconstructor's, on the same decoder
  input) learns the relative order of the patches' reconstruction losses (pairs with equal losses left
  out), and an EMA of the whole model ranks every patch of the unmasked image; a share of the mask
  growing linearly to ``hpm.final_share`` is taken from the patches it ranks hardest.

The two variants are parts, not branches of the loss: a :class:`Masks` (how the encoder's mask is drawn,
and any loss term that comes with it: :class:`HardPatches`) and a :class:`Decoding` (which positions the
decoder predicts: :class:`DualDecoding`). The loss is the same few lines for every combination, and a new
variant is one more part.
"""
from __future__ import annotations

import dataclasses
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
    """HPM's relative loss-prediction objective (``forward_learning_loss(relative=True)``): for every pair
    (i, j) of valid patches whose actual losses differ, binary cross-entropy of ``sigmoid(pred_i -
    pred_j)`` against ``actual_i > actual_j``, averaged over those pairs. [B, L] inputs."""
    logits = pred[:, :, None] - pred[:, None, :]
    labels = (actual[:, :, None] > actual[:, None, :]).astype(jnp.float32)
    pairs = (valid[:, :, None] & valid[:, None, :]) & (actual[:, :, None] != actual[:, None, :])
    bce = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    weight = pairs.astype(jnp.float32)
    return jnp.sum(bce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


class LossPredictor(nnx.Module):
    """HPM's loss predictor (official ``models_mae_learn_loss.py``): blocks, a norm and a head of its own,
    as deep as the reconstructor, on the same decoder input; the head is as wide as the targets and its
    outputs are averaged to one score per token."""

    def __init__(self, t: layers.Transformer, target_dim: int, *, rngs: nnx.Rngs):
        self.blocks = layers.Stack(t, rngs=rngs)
        self.norm = layers.LayerNorm(t.width, rngs=rngs, dtype=t.dtype, eps=t.norm_eps)
        self.head = layers.Dense(t.width, target_dim, ("embed", "patch"), rngs=rngs, dtype=t.dtype)

    def __call__(self, tokens: jax.Array, segments: layers.Segments | None = None) -> jax.Array:
        """tokens [B, T, width] -> [B, T] float32 predicted losses (relative: only their order is trained)."""
        return jnp.mean(self.head(self.norm(self.blocks(tokens, segments))).astype(jnp.float32), axis=-1)


class MAEDecoder(nnx.Module):
    """Encoder latents -> hidden states at the decoded positions; ``pred`` maps them to targets and the
    optional ``loss_pred`` branch (HPM, :class:`LossPredictor`) predicts each position's loss."""

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
        self.loss_pred = LossPredictor(t, target_dim, rngs=rngs) if predict_loss else None
        self.one_hot_gather = encoder.one_hot_gather

    def _positions(self) -> jax.Array:
        return jnp.asarray(vit.position_table(self.positions, self.width, self.grid), self.dtype)

    def _run(self, tokens: jax.Array, segments: layers.Segments | None, keep: slice, losses: bool):
        hidden = self.norm(self.blocks(tokens, segments))[:, keep]
        return (hidden, self.loss_pred(tokens, segments)[:, keep]) if losses else hidden

    def __call__(self, latent: jax.Array, restore_idx: jax.Array, losses: bool = False):
        """latent [B, prefix + K, enc_width], restore_idx [B, L] -> hidden [B, L, width], grid order; with
        ``losses`` also the loss predictor's [B, L] scores."""
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        batch, length = restore_idx.shape
        fill = jnp.broadcast_to(self.mask_token[...].astype(self.dtype), (batch, length - visible.shape[1], self.width))
        tokens = layers.gather_tokens(jnp.concatenate([visible, fill], axis=1), restore_idx, self.one_hot_gather)
        tokens = tokens + self._positions()[None]
        return self._run(jnp.concatenate([prefix, tokens], axis=1), None, slice(self.num_prefix, None), losses)

    def partial(self, latent: jax.Array, keep_idx: jax.Array, query_idx: jax.Array, query_valid: jax.Array,
                losses: bool = False):
        """Dual masking: the visible tokens (at ``keep_idx`` [B, K]) plus mask tokens at ``query_idx``
        [B, Q] only; invalid queries (``query_valid`` False) are hidden from attention. -> [B, Q, width]
        (and [B, Q] predicted losses with ``losses``)."""
        pos = self._positions()
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        visible = visible + jnp.take(pos, keep_idx, axis=0)
        queries = self.mask_token[...].astype(self.dtype) + jnp.take(pos, query_idx, axis=0)
        known = jnp.ones((x.shape[0], x.shape[1]), bool)
        tokens = jnp.concatenate([prefix, visible, queries], axis=1)
        attend = layers.Segments.keys(jnp.concatenate([known, query_valid], axis=1), tokens.shape[1])
        return self._run(tokens, attend, slice(tokens.shape[1] - query_idx.shape[1], None), losses)


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
            "workdir": ("", "loss.target=teacher: the run whose encoder is the frozen teacher ('' and no "
                            "teacher.hf_dir: a random encoder of this run's architecture, dBOT's first stage)."),
            "step": (0, "Checkpoint of teacher.workdir to load (0: the newest)."),
            "hf_dir": ("", "loss.target=teacher: a transformers ViT / ViTMAE directory (model.safetensors + "
                           "config.json, fixed sin-cos positions) whose encoder is the frozen teacher."),
        },
        "hpm": {
            "enabled": (False, "Hard-patch mining (MAE): a loss-predictor branch learns the order of the patches' "
                               "losses; an EMA of the model picks the hardest for part of the mask."),
            "ema_decay": (0.999, "Decay of HPM's EMA model at step 0."),
            "ema_end_decay": (0.9999, "Decay of HPM's EMA model from hpm.ema_anneal_steps on (linear in between)."),
            "ema_anneal_steps": (0, "Steps over which the EMA decay rises (0: total_steps / 8, the official 100 of "
                                    "800 epochs)."),
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
        if t.workdir and t.hf_dir:
            raise ConfigError("teacher.hf_dir", "set teacher.workdir or teacher.hf_dir, not both")
        if self.config.hpm.enabled and self.target == "teacher":
            raise ConfigError("hpm.enabled", "HPM's EMA model and loss.target=teacher's frozen encoder cannot both be "
                                             "the run's teacher")
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
                raise ConfigError("teacher.workdir" if t.workdir else "teacher.hf_dir",
                                  f"{t.workdir or t.hf_dir!r} encodes a {grid} token grid, this run {self.token_grid}: "
                                  "the teacher must see the student's patches")

    target_kinds = vision.TARGETS + ("teacher",)

    def teacher_config(self):
        """The config the frozen teacher's encoder is built from: the saved run's, this run's with the
        transformers model's sizes (``teacher.hf_dir``), or this run's."""
        t = self.config.teacher
        if self.target != "teacher" or not (t.workdir or t.hf_dir):
            return self.config
        if getattr(self, "_teacher_config", None) is None:
            key = "teacher.workdir" if t.workdir else "teacher.hf_dir"
            saved = base.saved_json(t.workdir or t.hf_dir, key)
            path = storage.join(t.workdir or t.hf_dir, "config.json")
            self._teacher_config = base.from_saved(saved) if t.workdir else self._hf_teacher_config(saved, path)
        return self._teacher_config

    def _hf_teacher_config(self, hf: dict, path: str):
        """This run's config with the encoder of a transformers ViT / ViTMAE ``config.json``."""
        if hf.get("model_type") not in ("vit", "vit_mae"):
            raise ConfigError("teacher.hf_dir", f"{path}: model_type {hf.get('model_type')!r} is not vit or vit_mae")
        config = self.config.copy_and_resolve_references()
        try:
            config.model.update(width=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                                mlp_ratio=hf["intermediate_size"] / hf["hidden_size"], patch_size=hf["patch_size"],
                                qkv_bias=hf.get("qkv_bias", True), norm_eps=hf.get("layer_norm_eps", 1e-12),
                                cls_token=True, pre_norm=True, pos_embed="sincos")
            config.data.update(image_size=hf["image_size"], channels=hf.get("num_channels", 3))
        except KeyError as err:
            raise ConfigError("teacher.hf_dir", f"{path}: no {err.args[0]!r}") from None
        config.loss.target = "pixels"  # the teacher's own run: a plain MAE whose encoder the file fills
        config.teacher.hf_dir = ""
        return config

    def teacher(self) -> base.Teacher | None:
        if self.config.hpm.enabled:  # HPM's EMA of the whole model ranks the patches
            h = self.config.hpm
            steps = h.ema_anneal_steps or max(1, self.config.total_steps // 8)
            return base.Teacher(build=self.build, follows=(), rate=base.ema_rate(h.ema_decay, h.ema_end_decay, steps))
        if self.target != "teacher":
            return None
        t = self.config.teacher
        return base.Teacher(build=lambda rngs: vit.encoder_from_config(self.teacher_config(), rngs),
                            workdir=t.workdir or None, step=t.step, path=("encoder",),
                            hf=t.hf_dir or None,
                            source_config=self.teacher_config() if t.workdir or t.hf_dir else None)

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
    def decode(self, model: MAEModel, patches: jax.Array, mask: masking.Mask, losses: bool = False):
        """(hidden [B, L, width], predictions [B, L, target_dim] float32) of every position, grid order;
        with ``losses`` also the loss predictor's [B, L] scores."""
        out = model.decoder(model.encoder(patches, mask.keep_idx), mask.restore_idx, losses)
        hidden = out[0] if losses else out
        pred = model.decoder.pred(hidden).astype(jnp.float32)
        return (hidden, pred, out[1]) if losses else (hidden, pred)

    def loss(self, model: MAEModel, batch: dict, key: jax.Array, step: jax.Array, teacher=None):
        mask_keys, decoder_keys = masking.split_rows(base.example_keys(key, batch))
        patches = self.patches(batch)
        mask = self.masks.draw(model, patches, mask_keys, step, teacher)
        return self.masked_loss(model, batch, patches, mask, step, decoder_keys, teacher)

    def masked_loss(self, model: MAEModel, batch: dict, patches: jax.Array, mask: masking.Mask, step=0,
                    decoder_keys: jax.Array | None = None, teacher=None):
        """The loss given the encoder's mask: MSE of the predictions where the decoding scores them (the
        hidden patches, or those the dual decoder also keeps), plus the mask part's own term. ``teacher``:
        the frozen teacher encoder (``loss.target='teacher'``)."""
        out = self.decoding.decode(model, patches, mask, decoder_keys)
        if self.target == "teacher":  # (HPM's teacher is the EMA model; the two are exclusive)
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
        mask = self.masks.draw(model, patches, base.example_keys(key, batch), self.config.total_steps, model)
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
    ``scored`` [B, Q] is True; ``losses`` [B, Q] the loss predictor's scores (None without HPM);
    ``metrics`` it reports."""

    hidden: jax.Array
    pred: jax.Array
    positions: jax.Array | None
    scored: jax.Array
    metrics: dict
    losses: jax.Array | None = None


class Masks:
    """MAE's own masks: the configured mask kind, drawn per example; no loss term of its own."""

    predicts_loss = False  # the decoder needs HPM's loss-predictor branch

    def __init__(self, mae: MAE):
        self.mae = mae

    def validate(self) -> None:
        pass

    def draw(self, model: MAEModel, patches: jax.Array, keys: jax.Array, step, teacher=None) -> masking.Mask:
        """The encoder's mask of each example from its key (``keys`` [batch]); ``teacher``: the run's
        teacher model, where the part needs one."""
        return self.mae.draw_mask(keys)

    def terms(self, model: MAEModel, out: Decoded, target: jax.Array, step) -> tuple[jax.Array, dict]:
        """(extra loss, its metrics) given what the decoder predicted; ``{}``: no term."""
        return jnp.zeros(()), {}

    def flops(self) -> int:
        """Training FLOPs this part adds to the step."""
        return 0


class HardPatches(Masks):
    """HPM (Wang et al. 2023, official ``engine_pretrain.py`` / ``models_mae_learn_loss.py``): the
    decoder's loss-predictor branch learns the order of the hidden patches' reconstruction losses
    (pairwise, pairs with equal losses left out); an EMA of the whole model (decay ``hpm.ema_decay`` ->
    ``hpm.ema_end_decay``) runs on the unmasked image and a share of the mask growing linearly from 0 to
    ``hpm.final_share`` is taken from the patches its predictor ranks hardest, the rest drawn uniformly."""

    predicts_loss = True

    def validate(self) -> None:
        h = self.mae.config.hpm
        if not 0.0 <= h.final_share <= 1.0:
            raise ConfigError("hpm.final_share", f"must be in [0, 1], got {h.final_share}")
        for key in ("ema_decay", "ema_end_decay"):
            if not 0.0 <= h[key] <= 1.0:
                raise ConfigError(f"hpm.{key}", f"must be in [0, 1], got {h[key]}")
        if not isinstance(h.ema_anneal_steps, int) or h.ema_anneal_steps < 0:
            raise ConfigError("hpm.ema_anneal_steps", f"must be an int >= 0, got {h.ema_anneal_steps!r}")

    def hard_count(self, step) -> jax.Array:
        """Hidden patches taken from the predicted-hardest: ``int(masked * final_share * (step + 1) / T)``,
        at most ``final_share`` of them (the official ``int((L - len_keep) * keep_ratio)`` with keep_ratio
        (epoch + 1) / epochs * 0.5, per step instead of per epoch)."""
        mae = self.mae
        frac = jnp.clip((jnp.asarray(step, jnp.float32) + 1.0) / mae.config.total_steps, 0.0, 1.0)
        masked = mae.num_tokens - mae.num_kept
        return jnp.floor(mae.config.hpm.final_share * frac * masked + 1e-6).astype(jnp.int32)

    def predicted_difficulty(self, model: MAEModel, patches: jax.Array) -> jax.Array:
        """``model``'s loss predictor on the whole image (every patch visible), without gradient: [B, L]."""
        batch, length = patches.shape[:2]
        everything = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        _, scores = model.decoder(model.encoder(patches, everything), everything, losses=True)
        return jax.lax.stop_gradient(scores)

    def draw(self, model: MAEModel, patches: jax.Array, keys: jax.Array, step, teacher=None) -> masking.Mask:
        scores = self.predicted_difficulty(model if teacher is None else teacher, patches)
        masked, hard = self.mae.num_tokens - self.mae.num_kept, self.hard_count(step)
        return masking.per_row(lambda k, s: masking.hard_patch_mask(k, s, masked, hard), keys, scores)

    def terms(self, model: MAEModel, out: Decoded, target: jax.Array, step) -> tuple[jax.Array, dict]:
        actual = jax.lax.stop_gradient(jnp.mean(jnp.square(out.pred - target), axis=-1))
        rank_loss = pairwise_rank_loss(out.losses, actual, out.scored)
        return self.mae.config.hpm.weight * rank_loss, {
            "loss_prediction": rank_loss, "hard_count": self.hard_count(step).astype(jnp.float32)}

    def branch_flops(self, tokens: int) -> int:
        """Forward FLOPs of the loss-predictor branch on ``tokens`` decoder tokens (+ prefix)."""
        mae = self.mae
        m, dec, b = mae.config.model, mae.config.decoder, mae.config.batch_size
        total = tokens + (1 if m.cls_token else 0)
        return (layers.transformer_flops(b, total, dec.width, dec.depth, int(dec.width * m.mlp_ratio))
                + 2 * b * total * dec.width * mae.target_dim)

    def flops(self) -> int:
        # the student's branch (3x); the EMA model's encoder, decoder embedding and branch over the whole
        # image (1x: its reconstructor's output is unused, so XLA drops it); the EMA (3 per parameter)
        mae, length = self.mae, self.mae.num_tokens
        m, dec, b = mae.config.model, mae.config.decoder, mae.config.batch_size
        embed = 2 * b * (length + (1 if m.cls_token else 0)) * m.width * dec.width
        teacher = mae.encoder_flops(length) + embed + self.branch_flops(length)
        params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(
            nnx.state(nnx.eval_shape(lambda: mae.build(nnx.Rngs(0))))))
        return 3 * self.branch_flops(mae.decoding.tokens) + teacher + 3 * params


class Decoding:
    """MAE's decoding: mask tokens at every hidden position, every position predicted, the hidden ones
    scored."""

    def __init__(self, mae: MAE):
        self.mae = mae

    def validate(self) -> None:
        pass

    @property
    def tokens(self) -> int:
        """Decoder tokens per example (without the prefix)."""
        return self.mae.num_tokens

    def decode(self, model: MAEModel, patches: jax.Array, mask: masking.Mask, keys: jax.Array | None) -> Decoded:
        if self.mae.masks.predicts_loss:
            hidden, pred, losses = self.mae.decode(model, patches, mask, losses=True)
            return Decoded(hidden, pred, None, mask.mask, {}, losses)
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
        with_losses = self.mae.masks.predicts_loss
        out = model.decoder.partial(latent, mask.keep_idx, query_idx, scored, with_losses)
        hidden, losses = out if with_losses else (out, None)
        pred = model.decoder.pred(hidden).astype(jnp.float32)
        decoded = jnp.mean(scored.astype(jnp.float32)) * query_idx.shape[1] / self.mae.num_tokens
        return Decoded(hidden, pred, query_idx, scored, {"decoded_ratio": decoded}, losses)

    @property
    def tokens(self) -> int:
        return self.mae.num_kept + self.num_queries

    def flops(self) -> int:
        # the decoder runs on the visible tokens + its queries; the head on the queries only
        mae, queries = self.mae, self.num_queries
        return mae.decoder_flops(mae.num_kept, mae.num_kept + queries, queries)
