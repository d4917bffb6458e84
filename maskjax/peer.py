"""``maskjax bench --peer hf``: the same training step in PyTorch + transformers, timed in the same
process, alternately with maskjax's, so that the ratio is read under the same load and threads.

The peer gets maskjax's weights through ``maskjax export`` (so both sides hold the same model), trains
in float32 with dropout 0 and ``torch.optim.AdamW`` at the run's learning rate, betas, epsilon and
weight decay (and the run's gradient clipping), and draws its masks inside its timed step as maskjax
does: MAE's ``noise`` for ``ViTMAEForPreTraining``, a tube mask for ``VideoMAEForPreTraining`` (runs
laid out as VideoMAE's: the VideoMAE recipes); for ``BertForMaskedLM`` a per-row budget of
``round(mask.ratio x maskable)`` positions (at most ``mlm.max_predictions``) with BERT's 80/10/10 rule.
BERT is timed twice: with the prediction head on the gathered masked positions (Google's BERT, and
what maskjax's ``mlm.sparse`` does: the fair peer) and with transformers' stock head over every
position. Each round times ``steps`` steps of maskjax, then of each peer, after ``warmup`` untimed
steps of each; the ratio of a round is the peer's median step time over maskjax's, and the result is
the median over rounds. CPU only (the peer runs on the CPU): one JAX device, every thread.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from maskjax import aot, bench, export
from maskjax import config as config_lib
from maskjax import step as step_lib
from maskjax.errors import ConfigError

KINDS = ("hf",)


def _torch():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise bench.BenchError(f"--peer hf needs torch and transformers (pip install -e '.[interop]'): {err}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def _optimizer(torch, model, config):
    o = config.optim
    return torch.optim.AdamW(model.parameters(), lr=config_lib.lr(config), betas=(o.b1, o.b2), eps=o.eps,
                             weight_decay=o.weight_decay)


def _finish(torch, model, opt, loss, clip: float) -> float:
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _mae_peers(torch, model, config, objective) -> dict[str, Callable[[dict], float]]:
    opt = _optimizer(torch, model, config)
    length = objective.num_tokens

    def step(batch: dict) -> float:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        noise = torch.rand(pixels.shape[0], length)  # the mask, drawn inside the step
        return _finish(torch, model, opt, model(pixel_values=pixels, noise=noise).loss, config.optim.clip_norm)

    return {"ViTMAEForPreTraining": step}


def _mlm_peers(torch, model, config, objective) -> dict[str, Callable[[dict], float]]:
    opt = _optimizer(torch, model, config)
    tok, mlm, ratio = objective.tokenizer, config.mlm, float(config.mask.ratio)
    slots = mlm.max_predictions

    def corrupt(batch: dict):
        tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        maskable = torch.from_numpy(batch["maskable"].astype(bool))
        count = maskable.sum(1)
        budget = torch.clamp(torch.maximum(torch.round(count * ratio).long(), torch.clamp(count, max=1)), max=slots)
        rank = torch.rand(tokens.shape).masked_fill(~maskable, 2.0).argsort(1).argsort(1)
        selected = rank < budget[:, None]
        draw = torch.rand(tokens.shape)
        inputs = torch.where(selected & (draw < 0.8), torch.full_like(tokens, tok.mask_id), tokens)
        if mlm.replace:
            swap = selected & (draw >= 0.8) & (draw < 0.9)
            inputs = torch.where(swap, torch.randint(0, tok.vocab_size, tokens.shape), inputs)
        else:
            inputs = torch.where(selected, torch.full_like(tokens, tok.mask_id), tokens)
        attention = torch.from_numpy((batch["segment_ids"] > 0).astype(np.int64))
        return tokens, inputs, selected, attention

    def gathered(batch: dict) -> float:
        tokens, inputs, selected, attention = corrupt(batch)
        hidden = model.bert(input_ids=inputs, attention_mask=attention,
                            token_type_ids=torch.zeros_like(inputs)).last_hidden_state
        idx = torch.argsort((~selected).int(), dim=1, stable=True)[:, :slots]
        weights = selected.gather(1, idx).float()
        picked = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.cls(picked)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.gather(1, idx).flatten(),
                                                reduction="none")
        loss = (nll * weights.flatten()).sum() / weights.sum().clamp(min=1.0)
        return _finish(torch, model, opt, loss, config.optim.clip_norm)

    def dense(batch: dict) -> float:
        tokens, inputs, selected, attention = corrupt(batch)
        labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
        out = model(input_ids=inputs, attention_mask=attention, token_type_ids=torch.zeros_like(inputs), labels=labels)
        return _finish(torch, model, opt, out.loss, config.optim.clip_norm)

    return {"BertForMaskedLM, gathered head": gathered, "BertForMaskedLM, dense head": dense}


def _videomae_peers(torch, model, config, objective) -> dict[str, Callable[[dict], float]]:
    if config.mask.kind != "tube":
        raise ConfigError("mask.kind", f"{config.mask.kind!r}: the VideoMAE peer draws VideoMAE's tube masks")
    opt = _optimizer(torch, model, config)
    t, h, w = objective.token_grid
    kept = objective.num_kept // t  # tube masking: one spatial mask per clip, the same in every frame

    def step(batch: dict) -> float:
        clips = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 1, 4, 2, 3)))  # [B, T, C, H, W]
        rank = torch.rand(clips.shape[0], h * w).argsort(1).argsort(1)
        hidden = (rank >= kept).repeat(1, t)  # the mask, drawn inside the step
        out = model(pixel_values=clips, bool_masked_pos=hidden)
        return _finish(torch, model, opt, out.loss, config.optim.clip_norm)

    return {"VideoMAEForPreTraining": step}


# transformers architecture (maskjax export's --arch, the run's default one) -> the peers of its step
PEERS = {"vit_mae": _mae_peers, "videomae": _videomae_peers, "bert": _mlm_peers}


def check(config) -> str:
    """The export architecture whose PyTorch step is the peer of this run; a one-line error otherwise."""
    if jax.default_backend() != "cpu":
        raise bench.BenchError(f"--peer hf times PyTorch on the CPU; this run's JAX backend is "
                               f"{jax.default_backend()!r} (run it with JAX_PLATFORMS=cpu)")
    if jax.process_count() > 1:
        raise bench.BenchError("--peer hf runs in one process")
    if config.model.dtype != "float32":
        raise ConfigError("model.dtype", f"{config.model.dtype!r}: --peer hf compares float32 steps; add "
                                         "--config.model.dtype=float32")
    from maskjax import objectives

    export.interop(config)  # an unknown objective is named here
    if not objectives.REGISTRY[config.objective].peer:
        with_peer = sorted(name for name, cls in objectives.REGISTRY.items() if cls.peer)
        raise bench.BenchError(f"--peer hf: a {config.objective!r} run has no PyTorch peer here (objectives with one: "
                               f"{', '.join(with_peer)})")
    arch = export.default_arch(config)
    export.check_exportable(config, arch)  # a run no architecture can hold: the key that stops it
    if arch not in PEERS:
        raise bench.BenchError(f"--peer hf: no PyTorch step for --arch {arch} yet (peers: {', '.join(PEERS)})")
    return arch


def _time(fn: Callable[[], object], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def compare(config, steps: int, warmup: int, rounds: int, progress: bool = True) -> dict:
    """Times maskjax's train step and its PyTorch peers in ``rounds`` alternating rounds; one result row."""
    if steps < 1 or warmup < 0 or rounds < 1:
        raise bench.BenchError(f"--steps {steps}, --warmup {warmup}, --rounds {rounds}: need steps >= 1, "
                               "warmup >= 0, rounds >= 1")
    config = config_lib.override(config, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    arch = check(config)
    torch, transformers = _torch()
    setup = step_lib.build(config, devices=jax.devices()[:1])
    state = setup.init_fn()
    compiled, _, _ = aot.compile_step(setup)
    params = step_lib.host_params(state["params"])
    with tempfile.TemporaryDirectory() as tmp:
        export.export(config, params, "hf", tmp, arch)
        model = getattr(transformers, export.arch_class(config, arch)).from_pretrained(tmp)
    model.train()
    peers = PEERS[arch](torch, model, config, setup.objective)
    batch = next(bench.synthetic_batches(setup, config.seed))
    box = {"state": state}

    def ours():
        box["state"], metrics = compiled(box["state"], setup.global_batch(batch))
        jax.block_until_ready(box["state"])
        return metrics

    first_loss = {"maskjax": float(ours()["loss"])}
    for name, fn in peers.items():
        first_loss[name] = fn(batch)
    for _ in range(warmup):
        ours()
        for fn in peers.values():
            fn(batch)
    per_round = []
    for r in range(rounds):
        row = {"maskjax": statistics.median(_time(ours, steps))}
        for name, fn in peers.items():
            row[name] = statistics.median(_time(lambda: fn(batch), steps))
        per_round.append(row)
        if progress:  # a round takes minutes on a real model: one line each, kept
            print(f"peer round {r + 1}/{rounds}: maskjax {1000 * row['maskjax']:.0f} ms/step; "
                  + "; ".join(f"{n} {1000 * row[n]:.0f} ms/step" for n in peers), flush=True)
    ratios = {name: [r[name] / r["maskjax"] for r in per_round] for name in peers}
    return {
        "objective": config.objective, "peer": "hf", "arch": arch, "batch_size": config.batch_size,
        "dtype": "float32", "steps": steps, "warmup": warmup, "rounds": rounds,
        "cpu": bench.cpu_model(), "scan_layers": bool(config.model.scan_layers),
        "jax_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "step_seconds": per_round,
        "maskjax_step_seconds_median": statistics.median(r["maskjax"] for r in per_round),
        "peers": {name: {"step_seconds_median": statistics.median(r[name] for r in per_round),
                         "ratio_per_round": ratios[name], "ratio_median": statistics.median(ratios[name])}
                  for name in peers},
        "first_loss": first_loss,
    }


def report(row: dict) -> str:
    loop = "layer scan" if row["scan_layers"] else "unrolled layers"
    lines = [f"{row['objective']} (batch {row['batch_size']}, float32, 1 JAX CPU device, {loop}; torch {row['torch']} "
             f"with {row['torch_threads']} threads; {row['cpu'] or 'CPU model unknown'}): {row['rounds']} rounds of "
             f"{row['steps']} timed steps after {row['warmup']} warm-up",
             f"  maskjax  {1000 * row['maskjax_step_seconds_median']:8.0f} ms/step"]
    for name, peer in row["peers"].items():
        rounds = ", ".join(f"{x:.2f}" for x in peer["ratio_per_round"])
        lines.append(f"  {name}  {1000 * peer['step_seconds_median']:8.0f} ms/step: maskjax is "
                     f"{peer['ratio_median']:.2f}x as fast (rounds: {rounds})")
    return "\n".join(lines)
