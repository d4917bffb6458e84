"""ELECTRA: replaced-token detection (Clark et al. 2020; google-research/electra).

A small generator (an MLM of ``electra.generator_ratio`` of the discriminator's width, same depth)
fills the masked positions with tokens sampled from its own softmax; the discriminator reads the
result and classifies every non-padding token as original or replaced. Both train together in one
step: loss = MLM + ``electra.disc_weight`` x RTD. The two share their token and position embeddings
and the embedding LayerNorm (``untied_generator_embeddings=False``), each projecting them to its own
width when ``electra.embed_dim`` is narrower. Masking reuses :class:`~maskjax.objectives.mlm.MLM`
(``mask.*``, ``mlm.max_predictions``, spans and whole words included) with ELECTRA's replacement rule:
85% [MASK], 15% kept, no random tokens. A sampled token equal to the original counts as original,
as in the official ``_get_fake_data``.

Deviations from the official code, on purpose: masked positions are drawn without replacement
(``tf.random.categorical`` there can draw a position twice, so slightly fewer than 15% are distinct),
and the masking budget counts maskable tokens (the official counts [CLS]/[SEP] too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskjax import masking
from maskjax.errors import ConfigError
from maskjax.models import hf_layout as hf
from maskjax.models import layers
from maskjax.models import text as text_model
from maskjax.objectives import base
from maskjax.objectives.mlm import MLM
from maskjax.objectives.text import cross_entropy, gather_rows, mean_over_tokens, predicted_positions


class ElectraModel(nnx.Module):
    """The discriminator (encoder + ``disc_dense`` -> GELU -> ``disc_out``) and the generator (an MLM
    encoder whose embedding tables are the discriminator's)."""

    def __init__(self, discriminator: text_model.TextEncoder, generator: text_model.TextEncoder, *,
                 rngs: nnx.Rngs):
        self.discriminator, self.generator = discriminator, generator
        w, dtype = discriminator.width, discriminator.dtype
        self.disc_dense = layers.Dense(w, w, ("embed", "embed"), rngs=rngs, dtype=dtype)
        self.disc_out = layers.Dense(w, 1, ("embed", None), rngs=rngs, dtype=dtype)

    def disc_logits(self, hidden: jax.Array) -> jax.Array:
        """[..., width] -> replaced-token logits [...] (float32)."""
        return self.disc_out(layers.gelu(self.disc_dense(hidden)))[..., 0].astype(jnp.float32)


def sample_tokens(key: jax.Array, logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """One token per row of ``logits`` [..., V] from softmax(logits / temperature), by the Gumbel-max
    trick like the official ``sample_from_softmax``; no gradient flows through the draw."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32)) / temperature
    return jnp.argmax(logits + jax.random.gumbel(key, logits.shape), axis=-1).astype(jnp.int32)


def scatter_rows(tokens: jax.Array, idx: jax.Array, values: jax.Array, weights: jax.Array) -> jax.Array:
    """tokens [B, L] with ``values`` [B, P] written at ``idx`` [B, P] where ``weights`` (distinct idx per row)."""
    def row(t, i, v, w):
        return t.at[i].set(jnp.where(w, v, t[i]))

    return jax.vmap(row)(tokens, idx, values.astype(tokens.dtype), weights)


# --------------------------------------------------------------------------- transformers
# ElectraForPreTraining (the discriminator) and ElectraForMaskedLM (the generator), each a complete
# model: both files carry the shared embedding tables.

def _hf_embeddings() -> list:
    emb = "electra.embeddings."
    return [hf.Rule(f"{emb}word_embeddings.weight", "discriminator/token_embed"),
            hf.Rule(f"{emb}position_embeddings.weight", "discriminator/pos_embed"),
            *hf.norm(f"{emb}LayerNorm", "discriminator/embed_norm")]


def _hf_tower(objective, path: str) -> list:
    rules = hf.block_rules("electra.encoder.layer.{i}.", f"{path}/blocks/blocks/", hf.BERT_BLOCK,
                           objective.config.model.qkv_bias)
    if objective.embed_dim != (objective.config.model.width if path == "discriminator" else objective.generator_shape[0]):
        rules += hf.linear("electra.embeddings_project", f"{path}/embed_proj")
    return rules


def _hf_config(objective, width: int, heads: int, mlp: int) -> dict:
    m, tok = objective.config.model, objective.tokenizer
    return dict(model_type="electra", vocab_size=tok.vocab_size, embedding_size=objective.embed_dim,
                hidden_size=width, num_attention_heads=heads, intermediate_size=mlp,
                max_position_embeddings=m.max_len, type_vocab_size=2, pad_token_id=tok.pad_id,
                position_embedding_type="absolute", tie_word_embeddings=True)


def _hf_check(objective) -> None:
    m = objective.config.model
    if m.pre_norm:
        raise ConfigError("model.pre_norm", "True: transformers' ELECTRA is post-norm; only runs trained with "
                                            "model.pre_norm=False export to it")
    if m.positions != "learned":
        raise ConfigError("model.positions", f"{m.positions!r}: transformers' ELECTRA has learned positions")


HF_ARCHS = {
    "electra_discriminator": base.HFArch(
        cls="ElectraForPreTraining",
        groups=lambda o: [hf.Group("discriminator", _hf_embeddings() + _hf_tower(o, "discriminator")
                                   + hf.linear("discriminator_predictions.dense", "disc_dense")
                                   + hf.linear("discriminator_predictions.dense_prediction", "disc_out"))],
        config=lambda o: _hf_config(o, o.config.model.width, o.config.model.heads,
                                    int(o.config.model.width * o.config.model.mlp_ratio)),
        constants=lambda o: {"electra.embeddings.token_type_embeddings.weight": np.zeros((2, o.embed_dim), np.float32)},
        check=_hf_check, tokenizer=True),
    "electra_generator": base.HFArch(
        cls="ElectraForMaskedLM",
        groups=lambda o: [hf.Group("generator", _hf_embeddings() + _hf_tower(o, "generator")
                                   + hf.linear("generator_predictions.dense", "generator/head_dense")
                                   + hf.norm("generator_predictions.LayerNorm", "generator/head_norm")
                                   + [hf.Rule("generator_lm_head.bias", "generator/output_bias")])],
        config=lambda o: _hf_config(o, *o.generator_shape),
        constants=lambda o: {"electra.embeddings.token_type_embeddings.weight": np.zeros((2, o.embed_dim), np.float32)},
        check=_hf_check, tokenizer=True),
}


@base.register
class ELECTRA(MLM):
    name = "electra"
    peer = False  # its generator + discriminator step has no single transformers model
    interop = base.Interop(archs=tuple(HF_ARCHS), own=HF_ARCHS)
    config_groups = {
        **MLM.config_groups,
        "electra": {
            "generator_ratio": (0.25, "Generator width / discriminator width (official generator_hidden_size; "
                                      "its MLP is 4x its width, its heads max(1, width // 64), its depth the "
                                      "discriminator's)."),
            "embed_dim": (0, "Width of the shared token/position embeddings, projected up to each network's "
                             "width (ELECTRA-Small: 128); 0 = model.width."),
            "disc_weight": (50.0, "Weight of the replaced-token-detection loss (lambda; MLM's weight is 1)."),
            "temperature": (1.0, "Temperature of the generator's softmax when sampling replacements."),
            "mask_share": (0.85, "Share of the selected positions the generator sees as [MASK]; the rest keep "
                                 "their token (ELECTRA's rule; no random tokens)."),
        },
    }
    papers = {
        "electra_small": {
            "title": "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than Generators "
                     "(Clark et al. 2020), ELECTRA-Small",
            "official": "google-research/electra (configure_pretraining.py, run_pretraining.py, "
                        "pretrain/pretrain_helpers.py, model/optimization.py)",
            "values": {"batch_size": 128, "total_steps": 1_000_000, "optim.base_lr": 5e-4, "optim.warmup_steps": 10_000,
                       "optim.weight_decay": 0.01, "optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-6,
                       "optim.bias_correction": False, "optim.decay_roles": ("kernel", "embedding", "position"),
                       "optim.schedule": "linear", "optim.decay_start": "zero_scaled", "optim.clip_norm": 1.0,
                       "data.seq_len": 128, "model.width": 256, "model.depth": 12, "model.heads": 4,
                       "model.mlp_ratio": 4.0, "model.max_len": 512, "model.positions": "learned",
                       "model.pre_norm": False, "model.qkv_bias": True, "model.norm_eps": 1e-12,
                       "mask.ratio": 0.15, "mlm.max_predictions": 19, "electra.generator_ratio": 0.25,
                       "electra.embed_dim": 128, "electra.disc_weight": 50.0, "electra.temperature": 1.0,
                       "electra.mask_share": 0.85},
        },
    }

    @property
    def replace_shares(self):
        return (self.config.electra.mask_share, 0.0)

    @property
    def embed_dim(self) -> int:
        return self.config.electra.embed_dim or self.config.model.width

    @property
    def generator_shape(self) -> tuple[int, int, int]:
        """(width, heads, MLP width) of the generator, by the official get_generator_config."""
        width = int(round(self.config.model.width * self.config.electra.generator_ratio))
        return width, max(1, width // 64), 4 * width

    def validate(self) -> None:
        super().validate()
        e = self.config.electra
        if not 0.0 < e.generator_ratio <= 1.0 or self.generator_shape[0] < 1:
            raise ConfigError("electra.generator_ratio", f"must be in (0, 1] and leave a generator width >= 1, "
                                                         f"got {e.generator_ratio}")
        width, heads, _ = self.generator_shape
        if width % heads:
            raise ConfigError("electra.generator_ratio", f"generator width {width} is not divisible by its "
                                                         f"{heads} heads (width // 64)")
        if not isinstance(e.embed_dim, int) or isinstance(e.embed_dim, bool) or e.embed_dim < 0:
            raise ConfigError("electra.embed_dim", f"must be an int >= 0, got {e.embed_dim!r}")
        if not e.disc_weight >= 0:
            raise ConfigError("electra.disc_weight", f"must be >= 0, got {e.disc_weight}")
        if not e.temperature > 0:
            raise ConfigError("electra.temperature", f"must be > 0, got {e.temperature}")
        if not 0.0 <= e.mask_share <= 1.0:
            raise ConfigError("electra.mask_share", f"must be in [0, 1], got {e.mask_share}")
        if not self.config.mlm.sparse:
            raise ConfigError("mlm.sparse", "False: ELECTRA's generator predicts at the masked slots only")

    def build(self, rngs) -> ElectraModel:
        m = self.config.model
        emb = text_model.TextEmbedding(self.tokenizer.vocab_size, m.max_len, m.positions, self.embed_dim)
        disc = text_model.TextEncoder(layers.Transformer.from_model(m, pre_norm=m.pre_norm), emb, lm_head=False,
                                      rngs=rngs)
        width, heads, mlp = self.generator_shape
        gen = text_model.TextEncoder(
            layers.Transformer.from_model(m, width=width, heads=heads, mlp_dim=mlp, pre_norm=m.pre_norm),
            emb, tie_to=disc, rngs=rngs)
        return ElectraModel(disc, gen, rngs=rngs)

    # ---------------------------------------------------------------- the step
    def generate(self, model: ElectraModel, batch: dict, key: jax.Array, step):
        """(generator logits [B, P, V], targets [B, P], weights [B, P], slots idx [B, P]) of this step's masks."""
        return self.generator_logits(model, batch, *self.corrupt(batch, key, step))

    def generator_logits(self, model: ElectraModel, batch: dict, inputs: jax.Array, selected: jax.Array):
        """:meth:`generate` for given generator inputs [B, L] and selected positions [B, L]."""
        idx, weights = predicted_positions(selected, self.config.mlm.max_predictions)
        hidden = model.generator(inputs, batch["segment_ids"], batch["positions"])
        targets = jnp.take_along_axis(batch["tokens"], idx, axis=-1)
        return model.generator.logits(gather_rows(hidden, idx)), targets, weights, idx

    def terms(self, model: ElectraModel, batch: dict, gen_logits, targets, weights, idx, sampled):
        """(loss, metrics) given the generator's logits at the masked slots and the tokens sampled there
        (the part of the step with no randomness: what the reference tests compare)."""
        e = self.config.electra
        w = weights.astype(jnp.float32)
        nll, correct = cross_entropy(gen_logits, targets)
        count = jnp.sum(w)
        mlm = jnp.sum(nll * w) / (count + 1e-6)
        fake = scatter_rows(batch["tokens"], idx, sampled, weights)
        replaced = fake != batch["tokens"]
        hidden = model.discriminator(fake, batch["segment_ids"], batch["positions"])
        logits = model.disc_logits(hidden)
        real = (batch["segment_ids"] != 0).astype(jnp.float32)
        disc = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, replaced.astype(jnp.float32)) * real) / (
            jnp.sum(real) + 1e-6)
        loss = mlm + e.disc_weight * disc
        disc_right = ((logits > 0) == replaced).astype(jnp.float32) * real
        metrics = {"loss": loss, "mlm_loss": mlm, "disc_loss": disc,
                   "accuracy": jnp.sum(correct * w) / jnp.maximum(count, 1.0),
                   "sampled_accuracy": jnp.sum((sampled == targets) * w) / jnp.maximum(count, 1.0),
                   "disc_accuracy": jnp.sum(disc_right) / jnp.maximum(jnp.sum(real), 1.0),
                   "replaced": jnp.sum(replaced * real) / jnp.maximum(jnp.sum(real), 1.0),
                   "mask_ratio": count / jnp.maximum(jnp.sum(batch["maskable"]), 1)}
        return loss, metrics

    def sample_fakes(self, batch: dict, key: jax.Array, gen_logits: jax.Array) -> jax.Array:
        """The generator's samples [B, P] at the masked slots, each example's from its own key."""
        temperature = self.config.electra.temperature
        return masking.per_row(lambda k, logits: sample_tokens(k, logits, temperature),
                               base.example_keys(key, batch), gen_logits)

    def loss(self, model, batch: dict, key: jax.Array, step: jax.Array):
        k_mask, k_sample = jax.random.split(key)
        gen_logits, targets, weights, idx = self.generate(model, batch, k_mask, step)
        sampled = self.sample_fakes(batch, k_sample, gen_logits)
        return self.terms(model, batch, gen_logits, targets, weights, idx, sampled)

    # ---------------------------------------------------------------- evaluation
    def text_features(self, model: ElectraModel, batch: dict) -> jax.Array:
        """The discriminator's features (the network ELECTRA keeps for downstream tasks)."""
        hidden = model.discriminator(batch["tokens"], batch["segment_ids"], batch["positions"])
        return mean_over_tokens(hidden, batch["segment_ids"])

    def eval_step(self, model, batch: dict, key: jax.Array, unigram: jax.Array) -> dict:
        """The generator's masked-token sums (with the unigram baseline) and the discriminator's."""
        k_mask, k_sample = jax.random.split(key)
        step = self.config.total_steps
        gen_logits, targets, weights, idx = self.generate(model, batch, k_mask, step)
        sampled = self.sample_fakes(batch, k_sample, gen_logits)
        _, m = self.terms(model, batch, gen_logits, targets, weights, idx, sampled)
        w = weights.astype(jnp.float32)
        nll, correct = cross_entropy(gen_logits, targets)
        real = jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32))
        maskable_unigram = jnp.where(jnp.isin(jnp.arange(unigram.shape[0]), jnp.asarray(self.tokenizer.special_ids)),
                                     -jnp.inf, unigram)
        sums = {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w),
                "disc_correct": m["disc_accuracy"] * real, "disc_nll": m["disc_loss"] * real,
                "replaced": m["replaced"] * real, "tokens": real}
        sums.update(self.baseline_sums(jax.nn.log_softmax(maskable_unigram), targets, w))
        return sums

    @staticmethod
    def summarize(totals: dict) -> dict:
        out = MLM.summarize(totals)
        n = max(totals["tokens"], 1.0)
        replaced = totals["replaced"] / n
        out.update(disc_accuracy=totals["disc_correct"] / n, disc_loss=totals["disc_nll"] / n,
                   replaced_share=replaced, baseline_disc_accuracy=max(replaced, 1.0 - replaced))
        return out

    def flops(self) -> int:
        """Forward + backward (x3) of both encoders, the generator head at the masked slots, the
        discriminator head at every position and the embedding projections."""
        m, b, n = self.config.model, self.config.batch_size, self.seq_len
        vocab, e, p = self.tokenizer.vocab_size, self.embed_dim, self.config.mlm.max_predictions
        gw, _, gm = self.generator_shape
        gen = layers.transformer_flops(b, n, gw, m.depth, gm) + 2 * b * p * (gw * e + e * vocab)
        disc = layers.transformer_flops(b, n, m.width, m.depth, int(m.width * m.mlp_ratio))
        disc += 2 * b * n * (m.width * m.width + m.width)
        proj = 2 * b * n * e * (gw * (e != gw) + m.width * (e != m.width))
        return 3 * (gen + disc + proj)
