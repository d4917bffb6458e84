"""The one trainer: sharded state, one jitted train step, the loop, checkpoints and evaluation.

Sections:
  1. setup       objective, mesh, shardings, optimizer; state created already sharded
  2. step        pure ``train_step(state, batch) -> (state, metrics)``, jitted once, state donated
  3. loop        host feeds batches, logs every ``log_every`` steps, saves asynchronously, evaluates
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskjax import checkpoint as ckpt_lib
from maskjax import config as config_lib
from maskjax import metrics as metrics_lib
from maskjax import distributed, objectives, sharding
from maskjax import data

# =========================================================================== 1. setup


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``base_lr * batch / base_batch``, then cosine / linear / constant."""
    o = config.optim
    peak = config_lib.lr(config)
    floor = peak * o.min_lr_ratio
    decay_steps = max(config.total_steps - o.warmup_steps, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0, peak, o.warmup_steps) if o.warmup_steps else optax.constant_schedule(peak)
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def decay_mask(axes: Any) -> Any:
    """Weight decay on matrices only: a parameter decays when it has two or more named feature axes
    (kernels), not on biases, norms, cls/mask tokens (MAE's ``param_groups_lrd`` rule)."""
    return jax.tree.map(
        lambda names: sum(n not in (None, "layers") for n in names) >= 2, axes)


def make_optimizer(config, axes: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = config.optim
    schedule = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask(axes)))
    return optax.chain(*parts), schedule


def _opt_state_axes(abstract_opt_state: Any, param_axes: Any) -> Any:
    """Logical names for optimizer-state leaves: a leaf whose trailing dict-key path is a parameter's
    path (Adam's mu and nu) inherits that parameter's names; scalars (counts) stay replicated."""
    by_path = {
        tuple(k.key for k in path): names
        for path, names in jax.tree_util.tree_flatten_with_path(param_axes)[0]
    }

    def names_for(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, entry.key)
        names = by_path.get(tuple(keys))
        return names if names is not None and len(names) == len(leaf.shape) else sharding.Names((None,) * len(leaf.shape))

    return jax.tree_util.tree_map_with_path(names_for, abstract_opt_state)


@dataclasses.dataclass
class Setup:
    """Everything the loop, the evaluator and the benchmark need, built once from a config."""

    config: Any
    objective: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    param_axes: Any
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying shardings (for restore)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    init_fn: Callable  # () -> state, jitted, created sharded
    step_fn: Callable  # (state, batch) -> (state, metrics), jitted, state donated
    batch_shardings: dict

    def global_batch(self, local_batch: dict) -> dict:
        """Host-local rows -> global jax.Arrays sharded over data x fsdp (multi-process safe)."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
            for k, v in local_batch.items() if k in self.batch_shardings
        }

    def rows(self, batch_size: int):
        """The rows of a global batch of ``batch_size`` this process loads (``sharding.process_rows``)."""
        return sharding.process_rows(self.mesh, batch_size)


def build(config, devices=None) -> Setup:
    """Validates ``config`` against the devices and builds the sharded, jitted training functions."""
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(config, num_devices=len(devices))
    objective = objectives.get(config)
    try:
        mesh = sharding.make_mesh(dict(config.mesh), devices, dict(config.get("mesh_dcn", {})))
    except sharding.MeshError as err:
        raise config_lib.ConfigError("mesh_dcn", str(err)) from None
    seed_key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(seed_key)

    abstract_model = nnx.eval_shape(lambda: objective.build(nnx.Rngs(params=init_key)))
    graphdef, abstract_params_state = nnx.split(abstract_model)
    param_axes = sharding.logical_axes(abstract_params_state)
    optimizer, schedule = make_optimizer(config, param_axes)

    def init_params(key):
        return nnx.to_pure_dict(nnx.state(objective.build(nnx.Rngs(params=key))))

    def init_state():
        params = init_params(init_key)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    abstract = jax.eval_shape(init_state)
    state_axes = {
        "step": sharding.Names(),
        "params": param_axes,
        "opt_state": _opt_state_axes(abstract["opt_state"], param_axes),
    }
    state_shardings = sharding.tree_shardings(abstract, state_axes, mesh)
    with sharding.activation_mesh(mesh):
        init_fn = jax.jit(init_state, out_shardings=state_shardings)

    spec = objective.batch_spec()
    batch_shardings = {k: sharding.batch_sharding(mesh, len(shape)) for k, (shape, _) in spec.items()}
    accum = config.optim.grad_accum

    def loss_and_grads(params, batch, key, step):
        def loss_fn(p):
            loss, metrics = objective.loss(nnx.merge(graphdef, p), batch, key, step)
            return loss, metrics

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def train_step(state, batch):
        with sharding.activation_mesh(mesh):
            step = state["step"]
            key = jax.random.fold_in(train_key, step)
            params = state["params"]
            if accum == 1:
                (_, metrics), grads = loss_and_grads(params, batch, key, step)
            else:
                micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

                def body(total, inputs):
                    i, mb = inputs
                    out = loss_and_grads(params, mb, jax.random.fold_in(key, i), step)
                    return jax.tree.map(jnp.add, total, out), None

                first = jax.tree.map(lambda x: x[0], micro)
                shapes = jax.eval_shape(lambda: loss_and_grads(params, first, key, step))
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
                (_, metrics), grads = jax.tree.map(lambda x: x / accum, total)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            params = optax.apply_updates(params, updates)
            metrics = dict(metrics)
            metrics.update(
                grad_norm=optax.tree.norm(grads),
                param_norm=optax.tree.norm(params),
                learning_rate=schedule(step),
            )
            return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics

    step_fn = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Setup(
        config=config, objective=objective, mesh=mesh, graphdef=graphdef, param_axes=param_axes,
        state_shardings=state_shardings,
        abstract_state=ckpt_lib.abstract_with_shardings(abstract, state_shardings),
        optimizer=optimizer, schedule=schedule, init_fn=init_fn, step_fn=step_fn, batch_shardings=batch_shardings,
    )


def init_params_fn(setup: Setup, key: jax.Array) -> Any:
    """Freshly initialised parameters (sharded) for ``key``: the random-init baseline of probes."""
    build_fn = lambda: nnx.to_pure_dict(nnx.state(setup.objective.build(nnx.Rngs(params=key))))
    with sharding.activation_mesh(setup.mesh):
        return jax.jit(build_fn, out_shardings=setup.state_shardings["params"])()


# =========================================================================== 3. loop


def train(config, workdir: str, *, stop_at: int | None = None, devices=None, evaluate: bool = True,
          quiet: bool = False) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its newest complete checkpoint.

    stop_at: leave after this step (with a checkpoint), as if interrupted; for resume tests.
    Returns a summary: first/last logged loss, steps run, eval results.
    """
    distributed.check_same(config)  # every process: same config, same code
    setup = build(config, devices)  # validation happens here, before anything is written
    process = jax.process_index()
    is_writer = process == 0
    loader = data.train_loader(config, setup.rows(config.batch_size), kind=setup.objective.data_kind)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    writer = metrics_lib.Writer(workdir, enabled=is_writer)

    start = checkpointer.latest_step()
    if start is None:
        start = 0
        state = setup.init_fn()
    else:
        state, loader_state = checkpointer.restore(start, setup.abstract_state)
        loader.set_state(loader_state)
        writer.truncate_after(start)
    if is_writer:
        _record_config(workdir, config, start)

    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    progress = metrics_lib.Progress(config.total_steps, start, config.batch_size, enabled=is_writer and not quiet)
    if start:
        progress.message(f"resumed from step {start} in {checkpointer.directory}")
    pending: list[dict] = []
    summary: dict = {"start_step": start, "losses": []}
    step = start
    try:
        for step in range(start, end):
            batch = setup.global_batch(next(loader))
            state, step_metrics = setup.step_fn(state, batch)
            pending.append(step_metrics)
            done = step + 1
            if done % config.log_every == 0 or done == end:
                values = {k: float(np.mean([float(m[k]) for m in jax.device_get(pending)])) for k in pending[0]}
                pending = []
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(f"non-finite loss {values['loss']} at step {done}")
                examples_per_sec, seconds_per_step = progress.rate(done)
                values.update(examples_per_sec=examples_per_sec, seconds_per_step=seconds_per_step)
                writer.scalars(done, values)
                progress.show(done, values["loss"], examples_per_sec, seconds_per_step)
                summary["losses"].append((done, values["loss"]))
            if done % config.checkpoint.every == 0 or done == end:
                checkpointer.save(done, state, loader.get_state())
            if evaluate and config.eval_every and done % config.eval_every == 0 and done != config.total_steps:
                _evaluate(setup, state["params"], workdir, done, writer, progress)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        # A cross-process collective failed: on CPU (gloo) and GPU (NCCL) a dead peer surfaces here.
        raise distributed.PeerLost(step + 1, checkpointer.latest_step(), err) from err
    progress.close()
    loader.close()
    checkpointer.close()
    summary["end_step"] = end
    if evaluate and end == config.total_steps and end > start:
        summary["eval"] = _evaluate(setup, state["params"], workdir, end, writer, progress)
    writer.close()
    summary["state"] = state
    return summary


def _evaluate(setup: Setup, params, workdir: str, step: int, writer, progress) -> dict:
    from maskjax import evaluate as eval_lib

    started = time.perf_counter()
    results = eval_lib.run(setup, params, workdir, step, writer)
    progress.message(eval_lib.summary_line(results) + f" ({time.perf_counter() - started:.0f}s)")
    return results


def _record_config(workdir: str, config, start_step: int) -> None:
    """``config.json`` is the run's config; ``runs.jsonl`` records every start that wrote here."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), "start_step": start_step, "config": config.to_dict()}, default=str) + "\n")
