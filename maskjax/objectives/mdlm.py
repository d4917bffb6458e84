"""Masked diffusion language model (MDLM, Sahoo et al. 2024; JAX reference: google-deepmind/md4).

Forward process: each token is absorbed into [MASK] independently with probability 1 - alpha(t).
Loss: the continuous-time negative ELBO per token,

    E_t [ w(t) * sum over masked positions of -log p(x0 | z_t) ] / tokens,   w(t) = -alpha'(t) / (1 - alpha(t)),

with the SUBS parameterisation: the [MASK] logit is -inf and unmasked tokens are copied through
(they contribute nothing). ``diffusion.schedule`` 'loglinear' (alpha = 1 - (1 - eps) t, so w = 1/t)
or 'cosine' (alpha = 1 - (1 - eps) cos(pi/2 (1 - t)), w = pi/2 tan(pi/2 (1 - t))); t in [eps, 1],
antithetic (one uniform shifted by i/B across the global batch) by default. Padding is never
noised; [CLS]/[SEP] are tokens like any other, so the sampler can end documents. No time
conditioning: with absorbing noise the share of [MASK] tokens tells the model t (as MDLM notes).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import masking
from maskjax.objectives import base
from maskjax.errors import ConfigError, UsageError
from maskjax.objectives.text import TextObjective, cross_entropy

SCHEDULES = ("loglinear", "cosine")
SAMPLE_ORDERS = ("ancestral", "confidence")


def alpha(schedule: str, t: jax.Array, eps: float) -> jax.Array:
    """alpha(t): the probability that a token is still unmasked at time t in [0, 1]."""
    if schedule == "loglinear":
        return 1.0 - (1.0 - eps) * t
    if schedule == "cosine":
        return 1.0 - (1.0 - eps) * jnp.cos(0.5 * math.pi * (1.0 - t))
    raise ValueError(f"diffusion.schedule={schedule!r} must be one of {SCHEDULES}")


def elbo_weight(schedule: str, t: jax.Array, eps: float) -> jax.Array:
    """w(t) = -alpha'(t) / (1 - alpha(t)), with alpha' by forward-mode autodiff."""
    value, slope = jax.jvp(lambda x: alpha(schedule, x, eps), (t,), (jnp.ones_like(t),))
    return -slope / (1.0 - value)


def sample_times(key: jax.Array, rows: jax.Array, total: int, eps: float, antithetic: bool = True) -> jax.Array:
    """t in [eps, 1] for the examples at ``rows`` [n] of a batch of ``total``: low-discrepancy (one
    uniform for the batch, shifted by row/total, mod 1) or iid (each row's own draw). Depends on the
    rows only, so a micro-batch gets the times its rows have in the full batch."""
    if antithetic:
        t = jnp.mod(jax.random.uniform(key, ()) + rows / total, 1.0)
    else:
        t = jax.vmap(lambda k: jax.random.uniform(k, ()))(masking.row_keys(key, rows))
    return eps + (1.0 - eps) * t


def subs_logits(logits: jax.Array, mask_id: int) -> jax.Array:
    """SUBS: the model never predicts [MASK]."""
    return logits.at[..., mask_id].set(-jnp.inf)


def nelbo_sums(logits: jax.Array, x0: jax.Array, masked: jax.Array, weight: jax.Array, mask_id: int) -> dict:
    """Summed ELBO terms: logits [B, L, V] (before SUBS), clean tokens x0 [B, L], masked [B, L],
    weight [B] = w(t). Returns {'nelbo': sum_b w_b sum_l masked * -log p(x0), 'correct', 'masked'}."""
    nll, correct = cross_entropy(subs_logits(logits, mask_id), x0)
    m = masked.astype(jnp.float32)
    per_row = jnp.sum(jnp.where(masked, nll, 0.0), axis=-1)
    return {"nelbo": jnp.sum(weight * per_row), "correct": jnp.sum(correct * m), "masked": jnp.sum(m)}


@base.register
class MDLM(TextObjective):
    name = "mdlm"
    config_groups = {
        "diffusion": {
            "schedule": ("loglinear", "Masked diffusion alpha(t) schedule: loglinear or cosine."),
            "eps": (1e-3, "Smallest diffusion time sampled."),
            "antithetic": (True, "Low-discrepancy (antithetic) sampling of t across the batch."),
            "sample_steps": (128, "Denoising steps of `maskjax sample`."),
        },
    }
    papers = {
        "mdlm": {
            "title": "Simple and Effective Masked Diffusion Language Models (Sahoo et al. 2024), OpenWebText",
            "official": "kuleshov-group/mdlm (diffusion.py, configs/)",
            "values": {"batch_size": 512, "data.seq_len": 1024, "optim.base_lr": 3e-4, "optim.warmup_steps": 2500,
                       "model.width": 768, "model.depth": 12, "model.heads": 12, "model.positions": "rotary",
                       "diffusion.schedule": "loglinear", "diffusion.antithetic": True},
        },
    }
    sample_kind = "text"

    @property
    def sample_steps(self) -> int:
        return self.config.diffusion.sample_steps

    def summary(self, results: dict) -> tuple[str, float | None]:
        text = results.get("text", {})
        return "perplexity_bound", text.get("perplexity_bound", text.get("perplexity"))

    def validate(self) -> None:
        super().validate()
        d = self.config.diffusion
        if d.schedule not in SCHEDULES:
            raise ConfigError("diffusion.schedule", f"must be one of {SCHEDULES}, got {d.schedule!r}")
        if not 0.0 < d.eps < 0.5:
            raise ConfigError("diffusion.eps", f"must be in (0, 0.5), got {d.eps}")
        if not isinstance(d.sample_steps, int) or d.sample_steps < 1:
            raise ConfigError("diffusion.sample_steps", f"must be a positive int, got {d.sample_steps!r}")

    def noise(self, batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(z_t [B, L], masked [B, L], w(t) [B]) for one draw of t per sequence."""
        d, x0 = self.config.diffusion, batch["tokens"]
        k_time, k_mask = jax.random.split(key)
        # Under gradient accumulation (rows given) the rows index the step's batch of config.batch_size.
        total = self.config.batch_size if base.ROW in batch else x0.shape[0]
        t = sample_times(k_time, base.example_rows(batch), total, d.eps, d.antithetic)
        move = 1.0 - alpha(d.schedule, t, d.eps)
        draw = masking.per_row(lambda k, x: jax.random.uniform(k, x.shape), base.example_keys(k_mask, batch), x0)
        masked = (draw < move[:, None]) & (batch["segment_ids"] > 0)
        return jnp.where(masked, self.tokenizer.mask_id, x0), masked, elbo_weight(d.schedule, t, d.eps)

    def sums(self, model, batch: dict, key: jax.Array, unigram: jax.Array | None = None) -> dict:
        """ELBO sums of one noise draw; with ``unigram`` [V] log-probs, also the unigram predictor's
        on the same draw (``baseline_*``)."""
        z, masked, weight = self.noise(batch, key)
        logits = model.logits(self.encode(model, batch, z))
        out = nelbo_sums(logits, batch["tokens"], masked, weight, self.tokenizer.mask_id)
        out["tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        if unigram is not None:
            uni_nll = -jax.nn.log_softmax(subs_logits(unigram, self.tokenizer.mask_id))[batch["tokens"]]
            out["baseline_nelbo"] = jnp.sum(weight * jnp.sum(jnp.where(masked, uni_nll, 0.0), axis=-1))
            out.update(self.baseline_sums(unigram, batch["tokens"], masked))
        return out

    def loss(self, model, batch: dict, key: jax.Array, step: jax.Array):
        s = self.sums(model, batch, key)
        loss = s["nelbo"] / jnp.maximum(s["tokens"], 1.0)
        return loss, {"loss": loss, "accuracy": s["correct"] / jnp.maximum(s["masked"], 1.0),
                      "mask_ratio": s["masked"] / jnp.maximum(s["tokens"], 1.0)}

    # ---------------------------------------------------------------- evaluation
    def eval_step(self, model, batch: dict, key: jax.Array, unigram: jax.Array) -> dict:
        """ELBO sums for the model and, on the same noise draw, for the unigram predictor."""
        return self.sums(model, batch, key, unigram)

    @staticmethod
    def summarize(totals: dict) -> dict:
        n, m = max(totals["tokens"], 1.0), max(totals["masked"], 1.0)
        nelbo, base = totals["nelbo"] / n, totals["baseline_nelbo"] / n
        return {"tokens": int(totals["tokens"]), "nelbo": nelbo, "loss": nelbo,
                "perplexity_bound": math.exp(min(nelbo, 700.0)),
                "accuracy": totals["correct"] / m, "baseline_most_frequent_accuracy": totals["baseline_correct"] / m,
                "baseline_unigram_nelbo": base, "baseline_unigram_loss": base,
                "baseline_unigram_perplexity_bound": math.exp(min(base, 700.0))}

    # ---------------------------------------------------------------- generation
    def template(self, prompt: str | None = None, infill: str | None = None) -> jnp.ndarray:
        """The fixed tokens of a conditional sample [seq_len] ([MASK] where the sampler fills in):
        ``prompt`` = [CLS] + its pieces, the rest of the row free (continuation); ``infill`` = [CLS] +
        the text with each ``[MASK]`` one free token and ``[MASK:n]`` n free tokens, then [SEP] and
        padding (only the marked tokens are generated). Neither: every position free."""
        tok, length = self.tokenizer, self.seq_len
        if prompt is not None and infill is not None:
            raise UsageError("give --prompt or --infill, not both")
        if prompt is None and infill is None:
            return jnp.full((length,), tok.mask_id, jnp.int32)
        if prompt is not None:
            ids = [tok.cls_id] + tok.encode_batch([prompt])[0]
        else:
            ids = [tok.cls_id]
            parts = re.split(r"\[MASK(?::(\d+))?\]", infill)
            for i, part in enumerate(parts):
                if i % 2:  # a count from [MASK:n] (None for a bare [MASK])
                    ids += [tok.mask_id] * int(part or 1)
                elif part and part.strip():
                    ids += tok.encode_batch([part])[0]
            if tok.mask_id not in ids:
                raise UsageError(f"--infill {infill!r} has no [MASK] or [MASK:n] to fill")
            ids.append(tok.sep_id)
        if len(ids) > length:
            raise ConfigError("data.seq_len", f"{length} is shorter than the {len(ids)} tokens of the "
                                              f"{'prompt' if prompt is not None else 'infill template'}")
        fill = tok.mask_id if prompt is not None else tok.pad_id
        return jnp.asarray(ids + [fill] * (length - len(ids)), jnp.int32)

    def end_documents(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(tokens, segment ids) with every position after a row's first [SEP] turned into padding
        (segment 0): the document ended there, and a token after it would be conditioned on text
        from another document, which training never shows within one segment."""
        tok = self.tokenizer
        is_sep = z == tok.sep_id
        after = (jnp.cumsum(is_sep, axis=-1) - is_sep) > 0
        return jnp.where(after, tok.pad_id, z), jnp.where(after, 0, 1).astype(jnp.int32)

    def sample(self, model, key: jax.Array, num: int, steps: int, template: jax.Array | None = None,
               order: str = "ancestral", block: int = 0) -> jax.Array:
        """[num, seq_len] tokens: every [MASK] of ``template`` (default: all positions) filled in
        ``steps`` steps; given tokens never change. ``order``: 'ancestral' (step t -> s reveals each
        masked token with probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from the SUBS
        distribution) or 'confidence' (MaskGIT-style: draw every masked token, keep the most probable
        draws so the masked share follows 1 - alpha(s)). ``block`` > 0: semi-autoregressive, blocks of
        that many positions left to right, each denoised in ``steps`` steps before the next opens.
        After each step the positions behind a row's first [SEP] become padding (:meth:`end_documents`);
        a [SEP] is never drawn before the template's last given token, so given tokens always survive."""
        if order not in SAMPLE_ORDERS:
            raise UsageError(f"--order {order!r} must be one of {SAMPLE_ORDERS}")
        d, length, mask_id = self.config.diffusion, self.seq_len, self.tokenizer.mask_id
        z = jnp.broadcast_to(self.template() if template is None else template, (num, length)).astype(jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (num, length))
        # NNX modules cannot be closed over by a lax loop: the parameters travel in the carry.
        graphdef, params = nnx.split(model)
        idx = jnp.arange(length)
        last_given = jnp.max(jnp.where(z != mask_id, idx, -1), axis=-1, keepdims=True)
        no_sep = (idx < last_given)[..., None] & (jnp.arange(self.tokenizer.vocab_size) == self.tokenizer.sep_id)
        starts = range(0, length, block) if block > 0 else [0]
        for start in starts:
            stop = start + block if block > 0 else length
            window = (idx >= start) & (idx < stop)
            z, segments = self.end_documents(z)
            total = jnp.sum((z == mask_id) & window, axis=-1)  # free tokens of this block, per row

            def body(i, carry, window=window, total=total):
                z, key, params = carry
                model = nnx.merge(graphdef, params)
                key, k_draw, k_reveal = jax.random.split(key, 3)
                t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
                a_t, a_s = alpha(d.schedule, t, d.eps), alpha(d.schedule, s, d.eps)
                z, segments = self.end_documents(z)
                logits = subs_logits(model.logits(model(z, segments, positions)), mask_id)
                logits = jnp.where(no_sep, -jnp.inf, logits)
                draw = jax.random.categorical(k_draw, logits, axis=-1).astype(z.dtype)
                masked = (z == mask_id) & window
                if order == "ancestral":
                    reveal = jax.random.uniform(k_reveal, z.shape) < (a_s - a_t) / (1.0 - a_t)
                else:
                    conf = jnp.take_along_axis(jax.nn.log_softmax(logits), draw[..., None], axis=-1)[..., 0]
                    conf = jnp.where(masked, conf, -jnp.inf)
                    rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)
                    a_1 = alpha(d.schedule, 1.0, d.eps)
                    keep = jnp.floor(total * (1.0 - a_s) / (1.0 - a_1)).astype(jnp.int32)
                    reveal = rank < jnp.maximum(jnp.sum(masked, axis=-1) - keep, 0)[:, None]
                return jnp.where(masked & reveal, draw, z), key, params

            key, k_block = jax.random.split(key)
            z, _, _ = jax.lax.fori_loop(0, steps, body, (z, k_block, params))
        return self.end_documents(z)[0]

    def flops(self) -> int:
        return 3 * self.encoder_flops(self.seq_len)
