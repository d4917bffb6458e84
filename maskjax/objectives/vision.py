"""What every masked-image objective (MAE, SimMIM, video MAE, FLIP's image tower) shares: config
checks, the batch layout, patch targets (pixels or HOG), the masker for the token grid, and frozen
features for probes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maskjax import masking
from maskjax.objectives import base
from maskjax.errors import ConfigError
from maskjax.models import layers, vit


NORM_PIX_MODES = ("patch", "channel")


def _pixel_groups(patches: jax.Array, channels: int, mode: str) -> tuple[jax.Array, int]:
    """Patch vectors [B, L, P] viewed as the groups each normalisation standardises, and the axis
    that runs within a group: 'patch' = the whole vector, 'channel' = each channel of the patch
    or tubelet (vectors are ordered (t, y, x, channel), so channels are the last, fastest axis)."""
    if mode not in NORM_PIX_MODES:
        raise ValueError(f"loss.norm_pix_mode={mode!r} must be one of {NORM_PIX_MODES}")
    if mode == "patch":
        return patches, -1
    return patches.reshape(patches.shape[:-1] + (patches.shape[-1] // channels, channels)), -2


def pixel_stats(patches: jax.Array, channels: int = 1, mode: str = "patch", eps: float = 1e-6
                ) -> tuple[jax.Array, jax.Array]:
    """(mean, scale) of each group, both shaped to broadcast against ``patches`` viewed as groups.
    The variance is the unbiased one (``torch.var``'s default, which MAE and VideoMAE use). 'patch':
    scale sqrt(var + eps) (MAE's ``norm_pix_loss``, also MAE-ST); 'channel': std + eps (VideoMAE's
    ``engine_for_pretraining``, per channel within each tubelet)."""
    x, axis = _pixel_groups(patches.astype(jnp.float32), channels, mode)
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.var(x, axis=axis, keepdims=True, ddof=1)
    scale = jnp.sqrt(var + eps) if mode == "patch" else jnp.sqrt(var) + eps
    return mean, scale


def norm_pix(patches: jax.Array, channels: int = 1, mode: str = "patch", eps: float = 1e-6) -> jax.Array:
    """Standardised pixel targets [B, L, P] (see :func:`pixel_stats` for the two modes)."""
    mean, scale = pixel_stats(patches, channels, mode, eps)
    x, _ = _pixel_groups(patches.astype(jnp.float32), channels, mode)
    return ((x - mean) / scale).reshape(patches.shape)


def denorm_pix(pred: jax.Array, patches: jax.Array, channels: int = 1, mode: str = "patch",
               eps: float = 1e-6) -> jax.Array:
    """Inverse of :func:`norm_pix` for predictions ``pred``, with the true statistics of ``patches``."""
    mean, scale = pixel_stats(patches, channels, mode, eps)
    x, _ = _pixel_groups(pred.astype(jnp.float32), channels, mode)
    return (x * scale + mean).reshape(pred.shape)


TARGETS = ("pixels", "hog")


def hog(images: jax.Array, cell: int = 8, bins: int = 9, eps: float = 1e-12) -> jax.Array:
    """MaskFeat's HOG features (SlowFast ``HOGLayerC``, without its Gaussian window).

    images [N, H, W, C] -> [N, H/cell, W/cell, C * bins]: Sobel gradients of each channel (reflect
    padding), unsigned orientation in ``bins`` bins over 180 degrees, magnitude-weighted histograms
    summed over ``cell x cell`` pixels, L2-normalised over the bins of each channel in each cell. A
    constant image has zero gradients and so all-zero features.
    """
    n, h, w, c = images.shape
    x = jnp.pad(images.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    smooth = lambda a, b, d: a + 2.0 * b + d  # Sobel's [1, 2, 1] across the derivative direction
    gx = smooth(x[:, :-2, :-2] - x[:, :-2, 2:], x[:, 1:-1, :-2] - x[:, 1:-1, 2:], x[:, 2:, :-2] - x[:, 2:, 2:])
    gy = smooth(x[:, :-2, :-2] - x[:, 2:, :-2], x[:, :-2, 1:-1] - x[:, 2:, 1:-1], x[:, :-2, 2:] - x[:, 2:, 2:])
    magnitude = jnp.sqrt(gx**2 + gy**2)
    phase = jnp.arctan2(gx, gy) / jnp.pi * bins  # in [-bins, bins]; floor mod bins folds to 180 degrees
    index = jnp.mod(jnp.floor(phase).astype(jnp.int32), bins)
    votes = jax.nn.one_hot(index, bins, dtype=jnp.float32) * magnitude[..., None]  # [N, H, W, C, bins]
    hist = votes.reshape(n, h // cell, cell, w // cell, cell, c, bins).sum(axis=(2, 4))
    hist = hist / jnp.maximum(jnp.linalg.norm(hist, axis=-1, keepdims=True), eps)
    return hist.reshape(n, h // cell, w // cell, c * bins)


class VisionObjective(base.Objective):
    """Base for objectives over images [B, H, W, C] or videos [B, T, H, W, C] in ``batch['image']``."""

    data_kind = "image"
    target_kinds: tuple[str, ...] = TARGETS  # the ``loss.target`` values this objective predicts

    def __init__(self, config):
        super().__init__(config)
        data, model = config.data, config.model
        self.frames = data.get("frames", 0)
        self.tubelet = model.tubelet if self.frames else 1

    # ---------------------------------------------------------------- config
    def validate(self) -> None:
        data, model = self.config.data, self.config.model
        try:
            vit.token_grid(data.image_size, model.patch_size, self.frames, self.tubelet)
        except ValueError as err:
            key = "data.frames" if "frames" in str(err) else "model.tubelet" if "tubelet=" in str(err) else "data.image_size"
            raise ConfigError(key, str(err)) from None
        base.check_transformer(model, config=self.config)
        if data.channels < 1:
            raise ConfigError("data.channels", f"must be >= 1, got {data.channels}")
        if model.pos_embed not in vit.POSITIONS:
            raise ConfigError("model.pos_embed", f"must be one of {vit.POSITIONS}, got {model.pos_embed!r}")
        stride = data.get("frame_stride", 1)
        if not isinstance(stride, int) or stride < 1:
            raise ConfigError("data.frame_stride", f"must be a positive int, got {stride!r}")
        if self.norm_pix_mode not in NORM_PIX_MODES:
            raise ConfigError("loss.norm_pix_mode", f"must be one of {NORM_PIX_MODES}, got {self.norm_pix_mode!r}")
        if self.target not in self.target_kinds:
            raise ConfigError("loss.target", f"must be one of {self.target_kinds} for {self.name}, got {self.target!r}")
        if self.target == "hog":
            cell = self.config.loss.hog_cell
            if not isinstance(cell, int) or cell < 1 or model.patch_size % cell:
                raise ConfigError("loss.hog_cell", f"{cell!r} must be a positive int dividing model.patch_size="
                                                   f"{model.patch_size}")
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

    def synthetic_batch(self, rng: np.random.Generator) -> dict:
        """A global batch of random normalised images (benchmarks without input data)."""
        b = self.config.batch_size
        return {"image": rng.standard_normal((b,) + self.image_shape(), np.float32),
                "label": rng.integers(0, 10, (b,), dtype=np.int32)}

    def patches(self, batch: dict) -> jax.Array:
        return vit.patchify(batch["image"].astype(jnp.float32), self.config.model.patch_size, self.tubelet)

    # ---------------------------------------------------------------- targets
    @property
    def target(self) -> str:
        return self.config.loss.target

    @property
    def norm_pix_mode(self) -> str:
        return self.config.loss.norm_pix_mode

    @property
    def target_dim(self) -> int:
        """Size of one patch's prediction target: pixels, or HOG cells x channels x bins."""
        if self.target == "pixels":
            return self.patch_dim
        loss = self.config.loss
        cells = (self.config.model.patch_size // loss.hog_cell) ** 2
        return cells * self.config.data.channels * loss.hog_bins * self.tubelet

    def targets(self, batch: dict, patches: jax.Array, norm: bool) -> jax.Array:
        """[B, L, target_dim]: the patches themselves (standardised per patch when ``norm``: MAE's
        norm_pix_loss), or MaskFeat's HOG features of each frame, grouped per patch / tubelet."""
        if self.target == "pixels":
            return norm_pix(patches, self.config.data.channels, self.norm_pix_mode) if norm else patches
        loss, images = self.config.loss, batch["image"]
        frames = images.reshape((-1,) + images.shape[-3:])  # video frames become images
        maps = hog(frames, loss.hog_cell, loss.hog_bins)
        maps = maps.reshape(images.shape[:-3] + maps.shape[1:])
        return vit.patchify(maps, self.config.model.patch_size // loss.hog_cell, self.tubelet)

    @property
    def num_kept(self) -> int:
        """Static visible-token count of the configured masker (from shapes only)."""
        return jax.eval_shape(lambda k: self.masker()(k, 1), jax.random.key(0)).keep_idx.shape[1]

    def masker(self):
        t, h, w = self.token_grid
        return masking.make_masker(self.config.mask, t, (h, w))

    def draw_mask(self, keys: jax.Array) -> masking.Mask:
        """The configured mask of each example, drawn from its own key (``keys`` [batch])."""
        return masking.per_example(self.masker(), keys)

    @property
    def evaluators(self) -> tuple[str, ...]:
        # predictions that are pixels a person can look at (not HOG features) make a reconstruction PNG
        return ("probe", "reconstruction") if self.target == "pixels" else ("probe",)

    @property
    def mask_ratio(self) -> float:
        return float(self.config.mask.ratio)

    @property
    def tokens_per_example(self) -> int:
        return self.num_tokens

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
