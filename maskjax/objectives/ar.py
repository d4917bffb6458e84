"""Autoregressive language model: the baseline masked diffusion is measured against.

The same text encoder, data, packing and FLOP accounting as MDLM, with a causal attention mask (a
token sees itself and the tokens before it, within its own segment) and the next-token loss: the
hidden state at position i predicts token i + 1 wherever i + 1 is in the same segment. So the loss
covers every token except the first of each segment piece in a row (a document's [CLS], or the
token a row was cut at), while MDLM's bound covers every token; the eval reports both counts.
Attention FLOPs are counted for the full L x L score matrix, as for MDLM: the causal mask is applied
to dense scores, so the step does that work (a causal kernel would halve it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from maskjax.objectives import base
from maskjax.objectives.text import TextObjective, cross_entropy


@base.register
class AR(TextObjective):
    name = "ar"
    interop = base.Interop()  # a causal model: BertForMaskedLM would read it bidirectionally
    papers = {
        "mdlm_ar": {
            "title": "Simple and Effective Masked Diffusion Language Models (Sahoo et al. 2024), its "
                     "autoregressive baseline on OpenWebText",
            "official": "kuleshov-group/mdlm (configs/config.yaml with backbone=ar, configs/model/small-ar.yaml, "
                        "configs/lr_scheduler/constant_warmup.yaml)",
            "values": {"batch_size": 512, "data.seq_len": 1024, "optim.base_lr": 3e-4, "optim.warmup_steps": 2500,
                       "optim.schedule": "constant", "optim.weight_decay": 0.0, "optim.b1": 0.9, "optim.b2": 0.999,
                       "optim.eps": 1e-8, "optim.clip_norm": 1.0, "total_steps": 1_000_000, "model.width": 768,
                       "model.depth": 12, "model.heads": 12, "model.positions": "rotary"},
        },
    }

    def encode(self, model, batch: dict, tokens: jax.Array) -> jax.Array:
        return model(tokens, batch["segment_ids"], batch["positions"], causal=True)

    @staticmethod
    def next_token_pairs(batch: dict) -> jax.Array:
        """[B, L - 1] bool: position i predicts token i + 1 (same segment, not padding)."""
        seg = batch["segment_ids"]
        return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)

    def sums(self, model, batch: dict, unigram: jax.Array | None = None) -> dict:
        tokens = batch["tokens"]
        logits = model.logits(self.encode(model, batch, tokens)[:, :-1])
        targets, pairs = tokens[:, 1:], self.next_token_pairs(batch)
        nll, correct = cross_entropy(logits, targets)
        w = pairs.astype(jnp.float32)
        out = {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w),
               "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
        if unigram is not None:
            out.update(self.baseline_sums(unigram, targets, w))
        return out

    def loss(self, model, batch: dict, key: jax.Array, step: jax.Array):
        s = self.sums(model, batch)
        count = jnp.maximum(s["count"], 1.0)
        loss = s["nll"] / count
        return loss, {"loss": loss, "accuracy": s["correct"] / count}

    # ---------------------------------------------------------------- evaluation
    def eval_step(self, model, batch: dict, key: jax.Array, unigram: jax.Array) -> dict:
        return self.sums(model, batch, unigram)

    @staticmethod
    def summarize(totals: dict) -> dict:
        n = max(totals["count"], 1.0)
        nll, base_nll = totals["nll"] / n, totals["baseline_nll"] / n
        return {"predicted_tokens": int(totals["count"]), "tokens": int(totals["tokens"]), "loss": nll,
                "perplexity": math.exp(min(nll, 700.0)), "accuracy": totals["correct"] / n,
                "baseline_most_frequent_accuracy": totals["baseline_correct"] / n,
                "baseline_unigram_loss": base_nll, "baseline_unigram_perplexity": math.exp(min(base_nll, 700.0))}

    def summary(self, results: dict) -> tuple[str, float | None]:
        return "perplexity", results.get("text", {}).get("perplexity")

    def flops(self) -> int:
        return 3 * self.encoder_flops(self.seq_len - 1)
