"""Masked language modelling (BERT / RoBERTa / SpanBERT family).

Masks are drawn on device from the step key, so every pass over the data sees new masks (RoBERTa's
dynamic masking). ``mask.kind`` picks token, whole-word or span (SpanBERT) selection; ``mask.ratio``
with ``mask.schedule``/``mask.final_ratio`` gives constant (15%, or 40% as in "Should You Mask 15%")
or decaying rates (30% -> 15%, "Dynamic Masking Rate Schedules"). Selected positions get BERT's
80/10/10 treatment ([MASK] / random token / unchanged, drawn once per token, word or span) unless
``mlm.replace`` is off (then all become [MASK]). With ``mlm.sparse`` the vocabulary projection runs
only at ``mlm.max_predictions`` static slots per sequence (BERT's ``max_predictions_per_seq``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskjax import masking
from maskjax.objectives import base
from maskjax.errors import ConfigError
from maskjax.objectives.text import TextObjective, cross_entropy, gather_rows, predicted_positions


def bert_corrupt(key: jax.Array, tokens: jax.Array, selected: jax.Array, unit: jax.Array, mask_id: int,
                 vocab_size: int, replace: bool = True, mask_share: float = 0.8,
                 random_share: float = 0.1) -> jax.Array:
    """Input ids with selected positions replaced: ``mask_share`` [MASK], ``random_share`` a uniformly
    random id, the rest kept (BERT 0.8/0.1, ELECTRA 0.85/0), one draw per ``unit`` (token, word or
    span id) so a word or span is treated as a whole."""
    if not replace:
        return jnp.where(selected, mask_id, tokens)
    k_kind, k_random = jax.random.split(key)
    draw = jnp.take_along_axis(jax.random.uniform(k_kind, tokens.shape), unit, axis=-1)
    out = jnp.where(selected & (draw < mask_share), mask_id, tokens)
    if random_share <= 0:
        return out
    random_ids = jax.random.randint(k_random, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
    return jnp.where(selected & (draw >= mask_share) & (draw < mask_share + random_share), random_ids, out)


@base.register
class MLM(TextObjective):
    name = "mlm"
    peer = True
    config_groups = {
        "mlm": {
            "replace": (True, "BERT's 80/10/10 rule ([MASK] / random token / unchanged); False = always [MASK]."),
            "max_predictions": (20, "Predicted positions per sequence (static; the sparse head's size)."),
            "sparse": (True, "Run the output head only at the predicted positions (False: at every position)."),
            "span_p": (0.2, "SpanBERT: geometric distribution parameter of span lengths in words."),
            "span_max": (10, "SpanBERT: longest span in words."),
        },
    }
    papers = {
        "bert": {
            "title": "BERT: Pre-training of Deep Bidirectional Transformers (Devlin et al. 2018), BERT-base",
            "official": "google-research/bert (create_pretraining_data.py, run_pretraining.py)",
            "values": {"batch_size": 256, "total_steps": 1_000_000, "optim.base_lr": 1e-4, "optim.warmup_steps": 10_000,
                       "optim.weight_decay": 0.01, "optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-6,
                       "optim.bias_correction": False,
                       "optim.decay_roles": ("kernel", "embedding", "position"), "optim.schedule": "linear",
                       "optim.decay_start": "zero",
                       "data.seq_len": 128, "model.width": 768, "model.depth": 12, "model.heads": 12,
                       "model.max_len": 512, "model.positions": "learned", "model.pre_norm": False,
                       "model.qkv_bias": True, "model.norm_eps": 1e-12, "mask.ratio": 0.15, "mlm.replace": True,
                       "mlm.max_predictions": 20},
        },
    }

    @property
    def mask_ratio(self) -> float:
        return float(self.config.mask.ratio)

    def validate(self) -> None:
        super().validate()
        mask, mlm = self.config.mask, self.config.mlm
        if mask.kind not in masking.TEXT_KINDS:
            raise ConfigError("mask.kind", f"must be one of {masking.TEXT_KINDS} for mlm, got {mask.kind!r}")
        try:
            self.ratio_schedule()
        except ValueError as err:
            key = "mask.schedule" if "schedule" in str(err) else "mask.final_ratio" if "end" in str(err) else "mask.ratio"
            raise ConfigError(key, str(err)) from None
        predictions = mlm.max_predictions
        if not isinstance(predictions, int) or not 1 <= predictions <= self.seq_len:
            raise ConfigError("mlm.max_predictions", f"must be an int in [1, data.seq_len={self.seq_len}], got {predictions!r}")
        top = max(mask.ratio, mask.final_ratio if mask.schedule != "constant" else 0.0)
        if round(top * self.seq_len) > predictions:
            raise ConfigError("mlm.max_predictions", f"{predictions} cannot hold mask ratio {top} x data.seq_len "
                                                      f"{self.seq_len} = {round(top * self.seq_len)} predictions; raise it")
        if mask.kind == "span":
            if not 0.0 < mlm.span_p <= 1.0:
                raise ConfigError("mlm.span_p", f"must be in (0, 1], got {mlm.span_p}")
            if not isinstance(mlm.span_max, int) or mlm.span_max < 1:
                raise ConfigError("mlm.span_max", f"must be a positive int, got {mlm.span_max!r}")

    def ratio_schedule(self):
        mask = self.config.mask
        end = None if mask.schedule == "constant" else mask.final_ratio
        return masking.ratio_schedule(mask.schedule, mask.ratio, end, self.config.total_steps)

    # [MASK] and random-token shares of the selected positions when mlm.replace is on (BERT's rule)
    replace_shares = (0.8, 0.1)

    def corrupt(self, batch: dict, key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
        """(corrupted input ids [B, L], selected [B, L]) for this step's masking rate; each example's
        selection and replacements are drawn from its own key (:func:`base.example_keys`)."""
        mask, mlm, tok = self.config.mask, self.config.mlm, self.tokenizer
        budget = masking.mlm_budget(batch["maskable"], self.ratio_schedule()(step), mlm.max_predictions)
        k_select, k_replace = masking.split_rows(base.example_keys(key, batch))
        selected, unit = masking.per_row(
            lambda k, words, eligible, n: masking.select_text(mask.kind, k, words, eligible, n, mlm.span_p,
                                                              mlm.span_max),
            k_select, batch["word_start"], batch["maskable"], budget)
        inputs = masking.per_row(
            lambda k, tokens, chosen, units: bert_corrupt(k, tokens, chosen, units, tok.mask_id, tok.vocab_size,
                                                          mlm.replace, *self.replace_shares),
            k_replace, batch["tokens"], selected, unit)
        return inputs, selected

    def predict(self, model, batch: dict, key: jax.Array, step) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits [B, P, V], targets [B, P], weights [B, P]): P = max_predictions slots when sparse,
        every position (weights = selected) when dense."""
        inputs, selected = self.corrupt(batch, key, step)
        hidden = self.encode(model, batch, inputs)
        targets, weights = batch["tokens"], selected
        if self.config.mlm.sparse:
            idx, weights = predicted_positions(selected, self.config.mlm.max_predictions)
            hidden, targets = gather_rows(hidden, idx), jnp.take_along_axis(targets, idx, axis=-1)
        return model.logits(hidden), targets, weights

    def sums(self, model, batch: dict, key: jax.Array, step) -> tuple[dict, jax.Array, jax.Array]:
        """({'nll', 'correct', 'count'} summed over predicted positions, targets [B, P], weights [B, P])."""
        logits, targets, weights = self.predict(model, batch, key, step)
        nll, correct = cross_entropy(logits, targets)
        w = weights.astype(jnp.float32)
        return {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}, targets, w

    def loss(self, model, batch: dict, key: jax.Array, step: jax.Array):
        s, _, _ = self.sums(model, batch, key, step)
        count = jnp.maximum(s["count"], 1.0)
        loss = s["nll"] / count
        metrics = {"loss": loss, "accuracy": s["correct"] / count,
                   "mask_ratio": s["count"] / jnp.maximum(jnp.sum(batch["maskable"]), 1)}
        return loss, metrics

    # ---------------------------------------------------------------- evaluation
    def eval_step(self, model, batch: dict, key: jax.Array, unigram: jax.Array) -> dict:
        """Sums over masked positions, with the masking rate at the end of training."""
        sums, targets, w = self.sums(model, batch, key, self.config.total_steps)
        maskable_unigram = jnp.where(jnp.isin(jnp.arange(unigram.shape[0]), jnp.asarray(self.tokenizer.special_ids)),
                                     -jnp.inf, unigram)
        sums.update(self.baseline_sums(jax.nn.log_softmax(maskable_unigram), targets, w))
        return sums

    @staticmethod
    def summarize(totals: dict) -> dict:
        n = max(totals["count"], 1.0)
        return {"masked_tokens": int(totals["count"]), "loss": totals["nll"] / n, "accuracy": totals["correct"] / n,
                "baseline_most_frequent_accuracy": totals["baseline_correct"] / n,
                "baseline_unigram_loss": totals["baseline_nll"] / n}

    def flops(self) -> int:
        predicted = self.config.mlm.max_predictions if self.config.mlm.sparse else self.seq_len
        return 3 * self.encoder_flops(predicted)
