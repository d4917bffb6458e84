"""MaskGIT (Chang et al. 2022): a bidirectional transformer over the tokens of a frozen VQ tokenizer,
trained to predict a masked share of them, that generates images by parallel iterative decoding.

Re-derived from the official JAX code (google-research/maskgit: ``libml/mask_schedule.py``,
``libml/parallel_decode.py``, ``nets/maskgit_transformer.py``, ``configs/maskgit_class_cond_config.py``)
and the paper (its training code is not public):

* **tokens**: the frozen tokenizer (a finished ``objective = "vq"`` run, ``maskgit.tokenizer``) maps
  each image to a grid of code indices inside the jitted step; it lives in the train state as a frozen
  :class:`~maskjax.objectives.base.Teacher` (no gradient, no optimizer state, saved with every
  checkpoint), so a run resumes and samples without its tokenizer's checkpoint.
* **masking**: per example r ~ U(0, 1) and ceil(gamma(r) N) of the N tokens hidden (gamma = cos(pi/2 r)
  by default, ``generate.schedule``), their ids replaced by [MASK].
* **network**: BERT's post-norm transformer (token + learned position embeddings, LayerNorm, blocks,
  the MLM head dense + GELU + LayerNorm with logits against the tied embedding table plus a bias);
  logits only over the codebook's ids. Class-conditional (``maskgit.class_conditional``): a class token
  before the image tokens (ids codebook + 1 + class), replaced by a null class with probability
  ``maskgit.label_drop`` (for classifier-free guidance; the original MaskGIT has none, MUSE added it).
* **loss**: cross-entropy with label smoothing (``maskgit.label_smoothing``, 0.1) on hidden positions only.
* **decoding** (:func:`parallel_decode`): start all-[MASK]; at step t of T draw every hidden token from
  the logits, score each draw by its log-probability plus ``choice_temperature * (1 - (t+1)/T)`` x
  Gumbel noise, and hide again the floor(N0 gamma((t+1)/T)) lowest-scoring new draws (at least 1, at
  most one fewer than were hidden); revealed tokens never change; the last step reveals all.

Not reproduced: dropout 0.1 (maskjax models have no dropout) and the conv VQGAN tokenizer (maskjax
trains a ViT VQ tokenizer; a user with MaskGIT's VQGAN weights would need a conv tokenizer objective).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax import config as config_lib
from maskjax import masking
from maskjax.errors import ConfigError
from maskjax.models import layers, text, vit
from maskjax.objectives import base
from maskjax.objectives.vq import VQ

# Shared by every objective that generates images by parallel decoding (MaskGIT, MAGE).
GENERATE = {
    "schedule": ("cosine", "Mask scheduling function gamma: cosine (MaskGIT), linear, square or sqrt."),
    "steps": (12, "Parallel decoding steps of `maskjax sample` and of the evaluation's samples."),
    "choice_temperature": (4.5, "Scale of the Gumbel noise on the confidence that picks which draws stay "
                                "revealed, annealed linearly to 0 over the steps (MaskGIT's 4.5)."),
    "guidance": (0.0, "Classifier-free guidance scale g: logits = cond + g (cond - uncond); 0 = off."),
    "eval_samples": (500, "Samples the evaluation draws for the Fréchet distance and class accuracy; 0 = none."),
}
TOKENIZER = {
    "tokenizer": ("", "Workdir of a finished `objective = 'vq'` run: the frozen tokenizer (its config.json "
                      "gives the architecture, its checkpoint the weights)."),
    "tokenizer_step": (0, "Checkpoint of maskgit.tokenizer to load (0 = the newest)."),
    "tokenizer_config": ("", "Without maskgit.tokenizer: a vq config file (path[:variant]) whose architecture is "
                             "built at a random initialisation and frozen (benchmarks, compile checks, tests; "
                             "the samples mean nothing)."),
}


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-position cross-entropy against (1 - s) one_hot + s / K (optax's ``smooth_labels``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)


def parallel_decode(logits_fn, model, tokens: jax.Array, mask_id: int, steps: int, key: jax.Array, *,
                    schedule: str = "cosine", choice_temperature: float = 4.5, trace: bool = False):
    """MaskGIT's scheduled parallel decoding. ``tokens`` [N, L] with ``mask_id`` where generation fills
    in; ``logits_fn(model, tokens) -> [N, L, K]`` float32. Returns the final tokens [N, L] (no
    ``mask_id`` left; given tokens unchanged), and with ``trace`` also (hidden [steps, N, L] bool after
    each step, draws [steps, N, L]: every position's token as the step saw it)."""
    unknown0 = jnp.sum(tokens == mask_id, axis=-1)  # [N]
    # NNX modules cannot be closed over by a lax loop (nor can arrays they are merged from): the
    # parameters travel in the carry and the module is merged inside.
    graphdef, params = nnx.split(model)

    def body(carry, t):
        z, key, params = carry
        key, k_draw, k_choice = jax.random.split(key, 3)
        logits = logits_fn(nnx.merge(graphdef, params), z)
        hidden = z == mask_id
        draw = jnp.where(hidden, jax.random.categorical(k_draw, logits, axis=-1).astype(z.dtype), z)
        ratio = (t + 1.0) / steps
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), draw[..., None], axis=-1)[..., 0]
        gumbel = jax.random.gumbel(k_choice, logp.shape)
        confidence = jnp.where(hidden, logp + choice_temperature * (1.0 - ratio) * gumbel, jnp.inf)
        target = jnp.floor(unknown0 * masking.generative_schedule(schedule, ratio)).astype(jnp.int32)
        count = jnp.maximum(1, jnp.minimum(jnp.sum(hidden, axis=-1) - 1, target))
        again = masking.lowest(confidence, count) & hidden & (t < steps - 1)
        z = jnp.where(again, mask_id, draw)
        return (z, key, params), (again, draw)

    (z, _, _), (hidden, draws) = jax.lax.scan(body, (tokens, key, params), jnp.arange(steps, dtype=jnp.float32))
    return (z, hidden, draws) if trace else z


class TokenObjective(base.Objective):
    """What masked generative models over a frozen tokenizer's codes share: the tokenizer (a frozen
    teacher), the vocabulary layout (codes, [MASK], classes), the batch, label-smoothed cross-entropy,
    parallel-decoding samples and their images. Subclasses set :attr:`group` (their config group)."""

    data_kind = "image"
    sample_kind = "image"
    eval_teacher = True
    group = "maskgit"

    def __init__(self, config):
        super().__init__(config)
        self._tokenizer = None

    # ---------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> VQ:
        """The VQ objective of the tokenizer run (its config: the saved run's, or ``tokenizer_config``)."""
        if self._tokenizer is None:
            g, key = self.config[self.group], f"{self.group}.tokenizer"
            if g.tokenizer:
                source = base.saved_config(g.tokenizer, key)
            elif g.tokenizer_config:
                try:
                    source = config_lib.load(g.tokenizer_config)
                except ConfigError as err:
                    raise ConfigError(f"{self.group}.tokenizer_config", str(err)) from None
            else:
                raise ConfigError(key, "no tokenizer: set it to a finished vq run's workdir (maskjax train --config "
                                       "configs/vq_digits.py --workdir W), or tokenizer_config for a random one")
            if source.objective != "vq":
                raise ConfigError(key, f"{g.tokenizer or g.tokenizer_config!r} is a {source.objective!r} run, not 'vq'")
            source = source.copy_and_resolve_references()
            with source.unlocked():
                source.batch_size = self.config.batch_size
            self._tokenizer = VQ(source)
        return self._tokenizer

    def teacher(self) -> base.Teacher:
        g, tok = self.config[self.group], self.tokenizer
        if g.tokenizer:
            return base.Teacher(build=tok.build, workdir=g.tokenizer, step=g.tokenizer_step, path=(),
                                source_config=tok.config)
        return base.Teacher(build=tok.build)  # frozen at a random initialisation

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.config.vq.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.num_tokens

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def tokens_per_example(self) -> int:
        return self.num_tokens

    @property
    def num_classes(self) -> int:
        return 0

    def tokenize(self, teacher, batch: dict) -> jax.Array:
        """Images -> the frozen tokenizer's codes [B, L] (no gradient reaches the tokenizer)."""
        return jax.lax.stop_gradient(self.tokenizer.tokens(teacher, batch))

    def images(self, tokens: jax.Array, hidden: jax.Array | None = None, *, teacher) -> jax.Array:
        """Tokens [N, L] -> images [N, H, W, C] (normalised like the data); ``hidden`` [N, L] patches at
        0 (the data mean), for decoding traces."""
        patches = self.tokenizer.detokenize(teacher, tokens)
        if hidden is not None:
            patches = jnp.where(hidden[..., None], 0.0, patches)
        tok = self.tokenizer
        return vit.unpatchify(patches, tok.image_shape(), tok.config.model.patch_size)

    def round_trip(self, model, batch: dict, *, teacher) -> jax.Array:
        """Images through the tokenizer and back (the best a token model can do)."""
        return self.images(self.tokenize(teacher, batch), teacher=teacher)

    # ---------------------------------------------------------------- config and data
    def validate(self) -> None:
        smoothing = self.config[self.group].label_smoothing
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"{self.group}.label_smoothing", f"must be in [0, 1), got {smoothing}")
        gen = self.config.generate
        if gen.schedule not in masking.GENERATIVE_SCHEDULES:
            raise ConfigError("generate.schedule", f"must be one of {masking.GENERATIVE_SCHEDULES}, got {gen.schedule!r}")
        if not isinstance(gen.steps, int) or gen.steps < 1:
            raise ConfigError("generate.steps", f"must be a positive int, got {gen.steps!r}")
        if gen.choice_temperature < 0:
            raise ConfigError("generate.choice_temperature", f"must be >= 0, got {gen.choice_temperature}")
        if not isinstance(gen.eval_samples, int) or gen.eval_samples < 0:
            raise ConfigError("generate.eval_samples", f"must be an int >= 0, got {gen.eval_samples!r}")
        if self.config.eval.finetune_epochs > 0:
            raise ConfigError("eval.finetune_epochs", f"{self.name} is probed on frozen features only (0)")
        tok, data = self.tokenizer.config.data, self.config.data
        for k in ("image_size", "channels"):
            if tok[k] != data[k]:
                raise ConfigError(f"{self.group}.tokenizer", f"the tokenizer was trained on data.{k}={tok[k]}, "
                                                             f"this run has {data[k]}")
        for k in ("mean", "std"):
            if not np.allclose(np.asarray(tok[k], np.float64), np.asarray(data[k], np.float64)):
                raise ConfigError(f"{self.group}.tokenizer", f"the tokenizer normalises with data.{k}={tok[k]}, "
                                                             f"this run with {data[k]}")
        if data.get("frames", 0):
            raise ConfigError("data.frames", f"{self.name} generates images, not video")
        base.check_transformer(self.config.model, config=self.config)

    # The batch is the tokenizer's (its data config equals this run's: validate checks it).
    def image_shape(self) -> tuple[int, ...]:
        return self.tokenizer.image_shape()

    def batch_spec(self) -> dict:
        return self.tokenizer.batch_spec()

    def synthetic_batch(self, rng: np.random.Generator) -> dict:
        return self.tokenizer.synthetic_batch(rng)

    def masked_loss(self, logits: jax.Array, tokens: jax.Array, hidden: jax.Array) -> tuple[jax.Array, dict]:
        """Label-smoothed cross-entropy of the code logits [B, L, K] on the ``hidden`` [B, L] positions
        only, with the accuracy there and the hidden share."""
        ce = smoothed_cross_entropy(logits, tokens, self.config[self.group].label_smoothing)
        h = hidden.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(h), 1.0)
        loss = jnp.sum(ce * h) / count
        correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
        return loss, {"loss": loss, "accuracy": jnp.sum(correct * h) / count, "mask_ratio": jnp.mean(h)}

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ("generation",)

    def summary(self, results: dict) -> tuple[str, float | None]:
        gen = results.get("generation", {})
        return "frechet_distance", gen.get("samples", {}).get("frechet_distance")

    @property
    def sample_steps(self) -> int:
        return self.config.generate.steps

    def tokenizer_flops(self) -> int:
        """Forward FLOPs of the tokenizer's encoder and code look-up on one batch."""
        tok, b = self.tokenizer, self.config.batch_size
        q, m = tok.config.vq, tok.config.model
        look_up = 2 * b * tok.num_tokens * (m.width * q.code_dim + q.codebook_size * q.code_dim)
        return tok.encoder_flops(tok.num_tokens) + look_up


class MaskGITModel(nnx.Module):
    """The bidirectional token transformer: BERT's post-norm encoder with its MLM head."""

    def __init__(self, t: layers.Transformer, vocab: int, length: int, *, rngs: nnx.Rngs):
        self.net = text.TextEncoder(t, text.TextEmbedding(vocab, length), rngs=rngs)
        self.length = length

    def __call__(self, tokens: jax.Array, codes: int) -> jax.Array:
        """tokens [B, length] -> logits over the ``codes`` codebook ids [B, length, codes] float32."""
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        hidden = self.net(tokens, jnp.ones((b, length), jnp.int32), positions)
        return self.net.logits(hidden, rows=codes)


@base.register
class MaskGIT(TokenObjective):
    name = "maskgit"
    group = "maskgit"
    config_groups = {
        "maskgit": {
            **TOKENIZER,
            "class_conditional": (True, "Condition on the label: a class token before the image tokens."),
            "num_classes": (10, "Classes of the class token (the dataset's labels)."),
            "label_drop": (0.1, "Probability that training replaces the class by the null class (for guidance)."),
            "label_smoothing": (0.1, "Label smoothing of the token cross-entropy (MaskGIT's 0.1)."),
        },
        "generate": GENERATE,
    }
    papers = {
        "maskgit": {
            "title": "MaskGIT: Masked Generative Image Transformer (Chang et al. 2022), ImageNet 256x256 class-conditional",
            "official": "google-research/maskgit (configs/maskgit_class_cond_config.py, libml/parallel_decode.py, "
                        "libml/mask_schedule.py)",
            "values": {"batch_size": 256, "optim.base_lr": 1e-4, "optim.b1": 0.9, "optim.b2": 0.96,
                       "optim.weight_decay": 0.045, "optim.warmup_steps": 5000, "model.width": 768,
                       "model.depth": 24, "model.heads": 16, "model.mlp_ratio": 4.0,
                       "maskgit.label_smoothing": 0.1, "maskgit.num_classes": 1000,
                       "generate.schedule": "cosine", "generate.choice_temperature": 4.5, "generate.steps": 12,
                       "data.image_size": 256},
        },
    }

    @property
    def num_classes(self) -> int:
        return self.config.maskgit.num_classes if self.config.maskgit.class_conditional else 0

    @property
    def prefix(self) -> int:
        return 1 if self.num_classes else 0

    @property
    def vocab_size(self) -> int:
        # codes, [MASK], the classes and the null class
        return self.codebook_size + 1 + (self.num_classes + 1 if self.num_classes else 0)

    def class_ids(self, labels: jax.Array | None, n: int) -> jax.Array:
        """Class-token ids [n]: codebook + 1 + label, or the null class where ``labels`` is None or < 0."""
        null = self.codebook_size + 1 + self.num_classes
        if labels is None:
            return jnp.full((n,), null, jnp.int32)
        return jnp.where(labels >= 0, self.codebook_size + 1 + labels, null).astype(jnp.int32)

    def validate(self) -> None:
        super().validate()
        g = self.config.maskgit
        if g.class_conditional and (not isinstance(g.num_classes, int) or g.num_classes < 2):
            raise ConfigError("maskgit.num_classes", f"must be an int >= 2 for a class-conditional model, got {g.num_classes!r}")
        if not 0.0 <= g.label_drop < 1.0:
            raise ConfigError("maskgit.label_drop", f"must be in [0, 1), got {g.label_drop}")

    def build(self, rngs: nnx.Rngs) -> MaskGITModel:
        t = layers.Transformer.from_model(self.config.model, pre_norm=False)
        return MaskGITModel(t, self.vocab_size, self.num_tokens + self.prefix, rngs=rngs)

    def logits(self, model: MaskGITModel, tokens: jax.Array, classes: jax.Array | None) -> jax.Array:
        """Code logits [B, L, K] of image tokens [B, L] (``classes`` [B] class-token ids, or None)."""
        if self.prefix:
            tokens = jnp.concatenate([classes[:, None], tokens], axis=1)
        return model(tokens, self.codebook_size)[:, self.prefix:]

    def draw(self, key: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array | None]:
        """Per example: (hidden [B, L] bool, ceil(gamma(r) L) positions with r ~ U(0, 1); class-token ids
        [B] with the null class at a ``label_drop`` share, or None when unconditional)."""
        k_ratio, k_mask, k_drop = masking.split_rows(base.example_keys(key, batch), 3)
        r = jax.vmap(lambda k: jax.random.uniform(k, ()))(k_ratio)
        ratio = masking.generative_schedule(self.config.generate.schedule, r)
        hidden = masking.per_row(lambda k, x: masking.generative_mask(k, self.num_tokens, x), k_mask, ratio)
        if not self.prefix:
            return hidden, None
        dropped = jax.vmap(lambda k: jax.random.uniform(k, ()))(k_drop) < self.config.maskgit.label_drop
        return hidden, self.class_ids(jnp.where(dropped, -1, batch["label"]), hidden.shape[0])

    def loss(self, model: MaskGITModel, batch: dict, key: jax.Array, step: jax.Array, teacher):
        tokens = self.tokenize(teacher, batch)
        hidden, classes = self.draw(key, batch)
        return self.masked_loss(self.logits(model, jnp.where(hidden, self.mask_id, tokens), classes), tokens, hidden)

    def sample(self, model: MaskGITModel, key: jax.Array, num: int, steps: int, labels: jax.Array | None = None,
               temperature: float | None = None, guidance: float | None = None, trace: bool = False):
        """Tokens [num, L] by :func:`parallel_decode` (``labels`` [num]: classes, -1 or None =
        unconditional); with ``guidance`` g > 0, logits = cond + g (cond - uncond)."""
        gen = self.config.generate
        temperature = gen.choice_temperature if temperature is None else temperature
        guidance = gen.guidance if guidance is None else guidance
        classes = self.class_ids(labels, num) if self.prefix else None
        null = self.class_ids(None, num) if self.prefix else None

        def logits_fn(model, z):
            if not (self.prefix and guidance):
                return self.logits(model, z, classes)
            both = self.logits(model, jnp.concatenate([z, z]), jnp.concatenate([classes, null]))
            cond, uncond = both[:num], both[num:]
            return cond + guidance * (cond - uncond)

        start = jnp.full((num, self.num_tokens), self.mask_id, jnp.int32)
        return parallel_decode(logits_fn, model, start, self.mask_id, steps, key, schedule=gen.schedule,
                               choice_temperature=temperature, trace=trace)

    def flops(self) -> int:
        m, b = self.config.model, self.config.batch_size
        length = self.num_tokens + self.prefix
        net = text.flops(b, length, m.width, m.depth, int(m.width * m.mlp_ratio), self.codebook_size, length)
        return 3 * net + self.tokenizer_flops()

