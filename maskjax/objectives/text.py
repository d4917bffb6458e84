"""What the text objectives (MLM, masked diffusion) share: the tokenizer, config checks, the packed
batch layout, the encoder, masked cross-entropy, and the sums a held-out evaluation adds up."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.objectives import base
from maskjax.errors import ConfigError
from maskjax.models import layers
from maskjax.models import text as text_model


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log p(target), argmax == target) per position; logits [..., V] float32, targets [...]."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


def mean_over_tokens(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """hidden [B, L, D] averaged over the positions that hold a token (segment id > 0) -> [B, D] float32."""
    w = (segment_ids > 0).astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, L, ...], idx [B, P] -> [B, P, ...]."""
    return jax.vmap(lambda row, i: jnp.take(row, i, axis=0))(x, idx)


def predicted_positions(selected: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """The first ``count`` selected positions per row (static shape, like BERT's
    ``masked_lm_positions``) and whether each slot holds one: ([B, count] int32, [B, count] bool)."""
    order = jnp.argsort(~selected, axis=-1, stable=True)[:, :count].astype(jnp.int32)
    return order, jnp.take_along_axis(selected, order, axis=-1)


def small_text_config(objective: str, tiny: bool = False):
    """The CPU-sized text run both ``configs/mlm_text.py`` and ``configs/mdlm_text.py`` start from:
    the embedded corpus packed to 64 tokens, a 4 x 128 encoder, batch 32, AdamW 1e-3 with warm-up.
    ``tiny`` shrinks it to a few seconds (tests, smoke runs)."""
    c = base.base_config(objective)
    c.batch_size = 32
    c.log_every = 50
    c.data.update(name="maskjax_text", train_split="train", eval_split="validation", seq_len=64, prefetch=8)
    c.model.update(width=128, depth=4, heads=4, mlp_ratio=4.0, max_len=64)
    c.optim.update(base_lr=1e-3, base_batch=32, b1=0.9, b2=0.98, weight_decay=0.01, warmup_steps=100,
                   clip_norm=1.0)
    c.checkpoint.update(every=500, keep=2)
    # the downstream task (eval.text_task): frozen-feature probes, and end-to-end fine-tuning to
    # convergence (10 epochs, 370 steps at batch 32 on the package task: training loss 2.08 -> 0.01),
    # for the pretrained encoder and its random init
    c.eval.update(batch_size=64, finetune_epochs=10.0, finetune_lr=1e-3)
    if tiny:
        c.update(batch_size=16, total_steps=6, log_every=2)
        c.data.seq_len = 32
        c.model.update(width=32, depth=2, heads=2, max_len=32)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 3
        c.eval.update(batch_size=16, max_batches=2, finetune_epochs=0.0)
    return c


class TextObjective(base.Objective):
    """Base for objectives over packed token sequences (see :mod:`maskjax.data.text`)."""

    data_kind = "text"
    interop = base.Interop(archs=("bert",))

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ("text", "text_probe")

    @property
    def tokens_per_example(self) -> int:
        return self.seq_len

    def summary(self, results: dict) -> tuple[str, float | None]:
        """The downstream task's fine-tuned accuracy, else its linear-probe accuracy, when it ran; else the
        held-out masked accuracy."""
        probe = results.get("text_probe", {}).get("pretrained")
        if probe and "finetune" in probe:
            return "text_finetune", probe["finetune"]["accuracy"]
        if probe:
            return "text_probe", probe["linear_probe"]
        return "masked_accuracy", results.get("text", {}).get("accuracy")

    @functools.cached_property
    def tokenizer(self):
        from maskjax.data import sources

        return sources.load_tokenizer(self.config.data)

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len

    # ---------------------------------------------------------------- config
    def validate(self) -> None:
        m, d = self.config.model, self.config.data
        base.check_transformer(m, config=self.config)
        for key, value in (("data.seq_len", d.seq_len), ("model.max_len", m.max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ConfigError(key, f"must be an int >= 2, got {value!r}")
        if m.positions not in text_model.POSITIONS:
            raise ConfigError("model.positions", f"must be one of {text_model.POSITIONS}, got {m.positions!r}")
        if m.positions == "learned" and d.seq_len > m.max_len:
            raise ConfigError("data.seq_len", f"{d.seq_len} is longer than the {m.max_len} positions the "
                                              "model's learned position table covers (model.max_len)")
        if m.positions == "rotary" and (m.width // m.heads) % 2:
            raise ConfigError("model.heads", f"rotary positions need an even head dim, got {m.width // m.heads}")
        from maskjax.data import sources

        sources.check_tokenizer(self.config.data)  # never prepares a corpus (validation writes nothing)

    # ---------------------------------------------------------------- model and data
    def build(self, rngs) -> text_model.TextEncoder:
        m = self.config.model
        return text_model.TextEncoder(layers.Transformer.from_model(m, pre_norm=m.pre_norm),
                                      text_model.TextEmbedding(self.tokenizer.vocab_size, m.max_len, m.positions),
                                      rngs=rngs)

    def batch_spec(self) -> dict:
        shape = (self.config.batch_size, self.seq_len)
        return {"tokens": (shape, jnp.int32), "segment_ids": (shape, jnp.int32), "positions": (shape, jnp.int32),
                "word_start": (shape, jnp.bool_), "maskable": (shape, jnp.bool_)}

    def synthetic_batch(self, rng: np.random.Generator) -> dict:
        """A global batch of random word pieces, one document per row (benchmarks without input data)."""
        b, n = self.config.batch_size, self.seq_len
        tok = self.tokenizer
        tokens = rng.integers(max(tok.special_ids) + 1, tok.vocab_size, (b, n), dtype=np.int32)
        tokens[:, 0], tokens[:, -1] = tok.cls_id, tok.sep_id
        maskable = np.ones((b, n), bool)
        maskable[:, [0, -1]] = False
        return {"tokens": tokens, "segment_ids": np.ones((b, n), np.int32),
                "positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy(),
                "word_start": np.ones((b, n), bool), "maskable": maskable}

    def encode(self, model: text_model.TextEncoder, batch: dict, tokens: jax.Array) -> jax.Array:
        """Hidden states [B, L, width] of ``tokens`` (the corrupted input) in ``batch``'s packing."""
        return model(tokens, batch["segment_ids"], batch["positions"])

    def text_features(self, model, batch: dict) -> jax.Array:
        """Frozen features [B, width] of uncorrupted text: hidden states averaged over real tokens."""
        return mean_over_tokens(self.encode(model, batch, batch["tokens"]), batch["segment_ids"])

    def encoder_flops(self, predicted: int) -> int:
        """Forward FLOPs of the encoder on all positions and the prediction head on ``predicted``."""
        m = self.config.model
        return text_model.flops(self.config.batch_size, self.seq_len, m.width, m.depth,
                                int(m.width * m.mlp_ratio), self.tokenizer.vocab_size, predicted)

    @staticmethod
    def baseline_sums(unigram: jax.Array, targets: jax.Array, weight: jax.Array) -> dict:
        """Most-frequent-token accuracy and unigram cross-entropy at the weighted positions."""
        w = weight.astype(jnp.float32)
        return {
            "baseline_correct": jnp.sum((targets == jnp.argmax(unigram)) * w),
            "baseline_nll": jnp.sum(jnp.where(w > 0, -unigram[targets], 0.0) * w),
        }
