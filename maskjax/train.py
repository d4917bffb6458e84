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
from jax.experimental import multihost_utils

from maskjax import checkpoint as ckpt_lib
from maskjax import config as config_lib
from maskjax import metrics as metrics_lib
from maskjax import distributed, faults, objectives, sharding
from maskjax import data
from maskjax.models import layers

# =========================================================================== 1. setup


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``base_lr * batch / base_batch``, then cosine / linear / constant decay to
    ``min_lr_ratio`` x peak. ``optim.decay_start``: 'warmup_end' runs the decay over the steps after
    the warm-up (MAE's ``lr_sched.py``); 'zero' runs it over all ``total_steps`` from step 0 and lets
    the warm-up replace its start (BERT's ``optimization.py``: polynomial decay of the global step)."""
    o = config.optim
    peak = config_lib.lr(config)
    floor = peak * o.min_lr_ratio
    start = o.warmup_steps if o.get("decay_start", "warmup_end") == "warmup_end" else 0
    decay_steps = max(config.total_steps - start, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not o.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, peak, o.warmup_steps)
    if start:
        return optax.join_schedules([warmup, decay], [o.warmup_steps])
    return lambda step: jnp.where(step < o.warmup_steps, warmup(step), decay(step))


def decay_mask(roles: Any, decay_roles) -> Any:
    """True where a parameter is weight-decayed: its role (``layers.ROLES``, set where the parameter is
    created) is one of ``decay_roles`` (``optim.decay_roles``). Biases, norms, cls/mask tokens, position
    tables and temperatures are never decayed in the published recipes; kernels always are; token
    embedding tables as each recipe's official code does (BERT decays them, and its position tables)."""
    decay_roles = frozenset(decay_roles)
    return jax.tree.map(lambda role: role in decay_roles, roles)


def scale_by_adam_without_bias_correction(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction m / (sqrt(v) + eps) from the raw moments, as BERT's ``AdamWeightDecayOptimizer``
    computes it (no 1 - b^t correction). Its state has optax's Adam layout, so checkpoints and the
    sharding of the moments are the same as with bias correction."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(config, roles: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (with global-norm clipping when ``optim.clip_norm`` > 0) and its LR schedule. ``roles``:
    the tree of parameter roles (:func:`maskjax.models.layers.param_roles`). ``optim.bias_correction``
    False gives BERT's variant; either way the chain is optax.adamw's, so the state layout is one."""
    o = config.optim
    schedule = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    mask = decay_mask(roles, o.decay_roles)
    if o.get("bias_correction", True):
        parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask))
    else:
        parts.append(optax.chain(scale_by_adam_without_bias_correction(o.b1, o.b2, o.eps),
                                 optax.add_decayed_weights(o.weight_decay, mask),
                                 optax.scale_by_learning_rate(schedule)))
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
    param_roles: Any  # layers.ROLES name of each parameter (weight decay, `maskjax params`)
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

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs of a global batch with the step's shardings (nothing allocated)."""
        return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=self.batch_shardings[k])
                for k, (shape, dtype) in self.objective.batch_spec().items()}

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
    param_roles = layers.param_roles(abstract_params_state)
    optimizer, schedule = make_optimizer(config, param_roles)

    def init_params(key):
        return nnx.to_pure_dict(nnx.state(objective.build(nnx.Rngs(params=key))))

    def init_state():
        params = init_params(init_key)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
                "skipped": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init_state)
    state_axes = {
        "step": sharding.Names(),
        "skipped": sharding.Names(),
        "params": param_axes,
        "opt_state": _opt_state_axes(abstract["opt_state"], param_axes),
    }
    state_shardings = sharding.tree_shardings(abstract, state_axes, mesh)
    with sharding.activation_mesh(mesh):
        init_fn = jax.jit(init_state, out_shardings=state_shardings)

    spec = objective.batch_spec()
    batch_shardings = {k: sharding.batch_sharding(mesh, len(shape)) for k, (shape, _) in spec.items()}
    accum = config.optim.grad_accum
    skip_nonfinite = config_lib.fault_policy(config)["nonfinite"] == "skip"

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
                # Micro-batch i takes rows i, i + accum, i + 2 accum, ...: each device's contiguous block of
                # the batch contributes to every micro-batch, so no rows move between devices (contiguous
                # blocks put each micro-batch on a subset of devices and cost all-gathers and permutes).
                micro = jax.tree.map(
                    lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), batch)

                def body(total, inputs):
                    i, mb = inputs
                    out = loss_and_grads(params, mb, jax.random.fold_in(key, i), step)
                    return jax.tree.map(jnp.add, total, out), None

                first = jax.tree.map(lambda x: x[0], micro)
                shapes = jax.eval_shape(lambda: loss_and_grads(params, first, key, step))
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
                (_, metrics), grads = jax.tree.map(lambda x: x / accum, total)
            metrics = dict(metrics)
            grad_norm = optax.tree.norm(grads)
            # A non-finite loss or gradient never reaches the state: the update runs under a cond and the
            # step leaves params and optimizer state as they were (finite gradients give finite Adam updates,
            # and a global norm that overflows is not finite). 'stop' also latches: after the first bad step
            # nothing changes until the host stops the run. (A cond instead of a select over the new and
            # old state saves three passes over the parameters and moments: 2.5% of a ViT-B step on CPU.)
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            apply = finite if skip_nonfinite else finite & (state["skipped"] == 0)

            def update(params, opt_state):
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            new_params, opt_state = jax.lax.cond(apply, update, lambda p, o: (p, o), params, state["opt_state"])
            metrics.update(grad_norm=grad_norm, param_norm=optax.tree.norm(new_params), learning_rate=schedule(step))
            skipped = state["skipped"] + (~apply).astype(jnp.int32)
            metrics.update(nonfinite=(~finite).astype(jnp.int32), skipped_steps=skipped)
            return {"step": step + 1, "params": new_params, "opt_state": opt_state, "skipped": skipped}, metrics

    step_fn = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Setup(
        config=config, objective=objective, mesh=mesh, graphdef=graphdef, param_axes=param_axes, param_roles=param_roles,
        state_shardings=state_shardings,
        abstract_state=ckpt_lib.abstract_with_shardings(abstract, state_shardings),
        optimizer=optimizer, schedule=schedule, init_fn=init_fn, step_fn=step_fn, batch_shardings=batch_shardings,
    )


def init_params_fn(setup: Setup, key: jax.Array) -> Any:
    """Freshly initialised parameters (sharded) for ``key``: the random-init baseline of probes."""
    build_fn = lambda: nnx.to_pure_dict(nnx.state(setup.objective.build(nnx.Rngs(params=key))))
    with sharding.activation_mesh(setup.mesh):
        return jax.jit(build_fn, out_shardings=setup.state_shardings["params"])()


def host_params(params: Any) -> dict:
    """Every parameter as a host NumPy array (gathered across processes when sharded over several)."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def initialize_from(setup: Setup, state: dict, path: str) -> tuple[dict, str]:
    """``state`` with the parameters ``path`` (``config.init_from``) provides; see :mod:`maskjax.export`.
    Every process reads the file; each device gets its own shard of every parameter."""
    from maskjax import export

    host = host_params(state["params"])
    params, report = export.import_params(setup.config, host, path)
    shardings = setup.state_shardings["params"]
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                          params, shardings)
    return dict(state, params=params), report


# =========================================================================== 3. loop


def train(config, workdir: str, *, stop_at: int | None = None, devices=None, evaluate: bool = True,
          quiet: bool = False) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its newest checkpoint that verifies.

    stop_at: leave after this step (with a checkpoint), as if interrupted; for resume tests.
    Returns a summary: first/last logged loss, steps run, eval results.
    Raises ``faults.Preempted`` after saving on SIGTERM / a preemption notice, ``faults.NonFiniteError``
    after saving the last good state (``faults.nonfinite='stop'``), ``checkpoint.CheckpointError`` for a
    checkpoint of another config or a failed checkpoint write.
    """
    faults.check_spec()
    distributed.check_same(config)  # every process: same config, same code
    setup = build(config, devices)  # validation happens here, before anything is written
    is_writer = jax.process_index() == 0
    policy = config_lib.fault_policy(config)
    loader = data.train_loader(config, setup.rows(config.batch_size), kind=setup.objective.data_kind)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                         checksum=config.checkpoint.get("checksum", True))
    restored = checkpointer.restore_newest(setup.abstract_state, describe=lambda: _config_change(workdir, config))
    if restored is None:
        start, state = 0, setup.init_fn()
        if config.get("init_from"):
            state, init_report = initialize_from(setup, state, config.init_from)
    else:
        start, state, loader_state = restored
        loader.set_state(loader_state)
    writer = metrics_lib.Writer(workdir, enabled=is_writer)
    writer.truncate_after(start)  # records written after the checkpoint by a run that died
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    progress = metrics_lib.Progress(config.total_steps, start, config.batch_size, enabled=is_writer and not quiet)
    if is_writer:
        change = _config_change(workdir, config)
        _record_config(workdir, config, start)
        if change and start:
            progress.message(f"note: the config differs from the previous run in this workdir{change}")
    if start:
        progress.message(f"resumed from step {start} in {checkpointer.directory}")
    elif config.get("init_from"):
        progress.message(init_report)
    window = _Window(start, loader.get_state())
    summary: dict = {"start_step": start, "losses": []}
    preemption = faults.Preemption()
    step, saved = start, start if restored else None
    try:
        for step in range(start, end):
            if step == start:
                faults.point("compile")
            host_batch = next(loader)
            if "nan" in faults.point("batch", step + 1):
                host_batch = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v
                              for k, v in host_batch.items()}
            state, step_metrics = setup.step_fn(state, setup.global_batch(host_batch))
            done = step + 1
            faults.point("step", done)
            window.add(done, step_metrics, loader.get_state())
            log_now = done % config.log_every == 0 or done == end
            save_now = done % config.checkpoint.every == 0 or done == end
            preempted = preemption.reached(done)
            if log_now or save_now or preempted:
                state, saved = _check_finite(window, state, setup, checkpointer, policy, saved, progress)
            if log_now:
                values = window.flush()
                examples_per_sec, seconds_per_step = progress.rate(done)
                values.update(examples_per_sec=examples_per_sec, seconds_per_step=seconds_per_step)
                if policy["bad_records"] == "skip":
                    values["bad_records"] = getattr(loader, "bad_records", 0)
                writer.scalars(done, values)
                progress.show(done, values["loss"], examples_per_sec, seconds_per_step)
                summary["losses"].append((done, values["loss"]))
            if (save_now or preempted) and saved != done:
                checkpointer.save(done, state, loader.get_state())
                saved = done
            if preempted:
                checkpointer.wait()
                raise faults.Preempted(done, checkpointer.directory, preemption.source)
            if evaluate and config.eval_every and done % config.eval_every == 0 and done != config.total_steps:
                _evaluate(setup, state["params"], workdir, done, writer, progress)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        # A cross-process collective failed: on CPU (gloo) and GPU (NCCL) a dead peer surfaces here.
        raise distributed.PeerLost(step + 1, checkpointer.latest_step(), err) from err
    except BaseException:
        if jax.process_count() == 1:  # let a save in flight commit; a half-written one would be discarded
            try:
                checkpointer.wait()
            except Exception:
                pass
        raise
    finally:
        preemption.close()
    progress.close()
    loader.close()
    checkpointer.close()
    summary["end_step"] = end
    if evaluate and end == config.total_steps and (end > start or not _has_eval(workdir, end)):
        summary["eval"] = _evaluate(setup, state["params"], workdir, end, writer, progress)
    writer.close()
    summary["state"] = state
    return summary


class _Window:
    """Metrics of the steps dispatched since the last log (device arrays until fetched) and the loader
    position after each step since the last check, so the state before any of them can be saved."""

    def __init__(self, step: int, loader_state: dict):
        self.metrics: list[tuple[int, dict]] = []
        self.loader_states = {step: loader_state}
        self.checked = step

    def add(self, step: int, metrics: dict, loader_state: dict) -> None:
        self.metrics.append((step, metrics))
        self.loader_states[step] = loader_state

    def fetch(self) -> list[tuple[int, dict]]:
        self.metrics = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.metrics]
        return self.metrics

    def flush(self) -> dict:
        """Mean of each metric over the window's steps with finite values (skipped steps do not count)."""
        rows = [m for _, m in self.fetch()]
        values = {}
        for key in rows[0]:
            if key == "nonfinite":
                continue
            finite = [r[key] for r in rows if np.isfinite(r[key])]
            values[key] = float(np.mean(finite)) if finite else float("nan")
        values["skipped_steps"] = int(rows[-1]["skipped_steps"])
        self.metrics = []
        return values


def _check_finite(window: _Window, state, setup: Setup, checkpointer, policy: dict, saved, progress):
    """Acts on steps whose loss/gradients were non-finite (already left out of the state by the step).

    'stop': save the last good state (the parameters before the first bad step) and raise
    ``faults.NonFiniteError``. 'skip': report them; stop the same way past ``max_skipped_steps``.
    Returns (state, step of the newest checkpoint started).
    """
    rows = window.fetch()
    bad = [(s, m) for s, m in rows if s > window.checked and m["nonfinite"]]
    last = window.checked
    window.checked = rows[-1][0] if rows else window.checked
    keep = {s: v for s, v in window.loader_states.items() if s >= window.checked}
    if not bad:
        window.loader_states = keep
        return state, saved
    first, m = bad[0]
    what = f"loss {m['loss']:.4g}, grad_norm {m['grad_norm']:.4g}, param_norm {m['param_norm']:.4g}"
    skipped = int(rows[-1][1]["skipped_steps"])
    if policy["nonfinite"] == "skip":
        for s, _ in bad:
            progress.message(f"step {s}: non-finite loss or gradient; update skipped ({skipped} skipped so far)")
        limit = policy["max_skipped_steps"]
        window.loader_states = keep
        if not limit or skipped <= limit:
            return state, saved
        done = window.checked
        if saved != done:
            checkpointer.save(done, state, window.loader_states[done])
        checkpointer.wait()
        raise faults.NonFiniteError(
            f"{skipped} steps had non-finite values, more than faults.max_skipped_steps={limit} (the last at step "
            f"{bad[-1][0]}: {what}); checkpoint step {done} in {checkpointer.directory} holds only good updates")
    good = first - 1  # 'stop' latched the state at the step before the first bad one
    note = "no update was applied"
    if good > 0 and saved != good:
        assert good >= last, (good, last)
        fixed = lambda value, sharding: jax.make_array_from_callback((), sharding, lambda _: np.int32(value))
        state = dict(state, step=fixed(good, setup.state_shardings["step"]),
                     skipped=fixed(0, setup.state_shardings["skipped"]))
        checkpointer.save(good, state, window.loader_states[good])
        saved = good
    if good > 0:
        note = f"the last good state is checkpoint step {good} in {checkpointer.directory}"
    checkpointer.wait()
    raise faults.NonFiniteError(
        f"non-finite loss or gradient at step {first} ({what}); {note}; to go on, lower the learning rate, add "
        "optim.clip_norm, or set faults.nonfinite=skip")


def _has_eval(workdir: str, step: int) -> bool:
    try:
        with open(os.path.join(workdir, "eval.json")) as f:
            return json.load(f).get("step") == step
    except (OSError, ValueError):
        return False


def _config_change(workdir: str, config) -> str:
    """' (model.width: 32 in the run that wrote it, 64 now; ...)' against ``workdir/config.json``, or ''."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return ""
    now = json.loads(config_lib.to_json(config))
    changes = [f"{key}: {a!r} in the run that wrote it, {b!r} now" for key, a, b in _diff(before, now)]
    return f" ({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''})" if changes else ""


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip("."), a, b


def _evaluate(setup: Setup, params, workdir: str, step: int, writer, progress) -> dict:
    from maskjax import evaluate as eval_lib

    started = time.perf_counter()
    results = eval_lib.run(setup, params, workdir, step, writer)
    progress.message(eval_lib.summary_line(results) + f" ({time.perf_counter() - started:.0f}s)")
    return results


def _record_config(workdir: str, config, start_step: int) -> None:
    """``config.json`` is the run's config; ``runs.jsonl`` records every start that wrote here."""
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config_lib.to_json(config))
    os.replace(tmp, os.path.join(workdir, "config.json"))
    with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), "start_step": start_step, "config": config.to_dict()}, default=str) + "\n")
