"""The layer between objectives and the programs that run them: config validation, the sharded
train state, the optimizer, and the one jitted train step.

  validate    the trainer's keys, the mesh against the device count, then the objective's own keys;
              reads the config only (never prepares a dataset or writes a file)
  build       objective, mesh, shardings, optimizer; state created already sharded; the pure
              ``train_step(state, batch) -> (state, metrics)``, jitted once, state donated
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from maskjax import checkpoint as ckpt_lib
from maskjax import config as config_lib
from maskjax import objectives, sharding, storage
from maskjax.errors import ConfigError
from maskjax.models import layers

# =========================================================================== validation


def _positive_int(config, key: str) -> None:
    value = config_lib.lookup(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"must be a positive int, got {value!r}")


def validate(config, num_devices: int | None = None) -> None:
    """Checks the trainer's keys, the mesh against the device count, then the objective's own keys."""
    for key in ("objective", "seed", "batch_size", "total_steps", "log_every", "data", "model",
                "optim", "mesh", "checkpoint", "eval", "faults"):
        config_lib.lookup(config, key)
    if config.objective not in objectives.REGISTRY:
        raise ConfigError("objective", f"unknown objective {config.objective!r}; known: {sorted(objectives.REGISTRY)}")
    for key in ("batch_size", "total_steps", "log_every", "checkpoint.every", "checkpoint.keep", "optim.grad_accum"):
        _positive_int(config, key)
    optim = config.optim
    if not (isinstance(optim.base_lr, float) and optim.base_lr > 0):
        raise ConfigError("optim.base_lr", f"must be a positive float, got {optim.base_lr!r}")
    if not 0 <= optim.warmup_steps <= config.total_steps:
        raise ConfigError("optim.warmup_steps", f"must be in [0, total_steps={config.total_steps}]")
    for key in ("optim.b1", "optim.b2"):
        if not 0.0 <= config_lib.lookup(config, key) < 1.0:
            raise ConfigError(key, f"must be in [0, 1), got {config_lib.lookup(config, key)}")
    if optim.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError("optim.schedule", f"must be cosine, linear or constant, got {optim.schedule!r}")
    if optim.decay_start not in ("warmup_end", "zero", "zero_scaled"):
        raise ConfigError("optim.decay_start", f"must be warmup_end, zero or zero_scaled, got {optim.decay_start!r}")
    if not isinstance(optim.warmup_linspace, bool):
        raise ConfigError("optim.warmup_linspace", f"must be True or False, got {optim.warmup_linspace!r}")
    if optim.warmup_linspace and optim.decay_start == "zero_scaled":
        raise ConfigError("optim.warmup_linspace", "True has no meaning with optim.decay_start='zero_scaled' "
                                                   "(its warm-up is a factor min(1, step / warmup))")
    if not (isinstance(optim.eps, float) and optim.eps > 0):
        raise ConfigError("optim.eps", f"must be a positive float, got {optim.eps!r}")
    roles = optim.decay_roles
    if isinstance(roles, str) or any(role not in layers.ROLES for role in roles):
        raise ConfigError("optim.decay_roles", f"must be a tuple of roles from {layers.ROLES}, got {roles!r}")
    policy = config.faults
    for key, allowed in (("nonfinite", ("stop", "skip")), ("bad_records", ("stop", "skip"))):
        if config_lib.lookup(config, f"faults.{key}") not in allowed:
            raise ConfigError(f"faults.{key}", f"must be one of {allowed}, got {policy[key]!r}")
    if not isinstance(policy.max_skipped_steps, int) or policy.max_skipped_steps < 0:
        raise ConfigError("faults.max_skipped_steps", f"must be an int >= 0, got {policy.max_skipped_steps!r}")
    if config.model.attention not in layers.ATTENTION:
        raise ConfigError("model.attention", f"must be one of {layers.ATTENTION}, got {config.model.attention!r}")
    eps = config.model.norm_eps
    if not (isinstance(eps, float) and eps > 0):
        raise ConfigError("model.norm_eps", f"must be a positive float, got {eps!r}")
    init_from = config.init_from
    if init_from and not storage.exists(init_from):
        raise ConfigError("init_from", f"{init_from!r} does not exist (a Hugging Face model directory or an .npz)")
    if config.batch_size % optim.grad_accum:
        raise ConfigError("optim.grad_accum", f"must divide batch_size={config.batch_size}")
    try:
        sharding.rules_with(config.sharding_rules)
    except sharding.MeshError as err:
        raise ConfigError("sharding_rules", str(err)) from None
    if num_devices is not None:
        try:
            shape = sharding.mesh_shape(dict(config.mesh), num_devices)
        except sharding.MeshError as err:
            raise ConfigError("mesh", str(err)) from None
        try:
            sharding.dcn_shape(shape, dict(config.mesh_dcn))
        except sharding.MeshError as err:
            raise ConfigError("mesh_dcn", str(err)) from None
        shards = shape[0] * shape[1]
        micro = config.batch_size // optim.grad_accum
        if micro % shards:
            raise ConfigError(
                "batch_size",
                f"{config.batch_size} (per micro-batch {micro}) is not divisible by the "
                f"{shards} data shards (mesh data x fsdp = {shape[0]} x {shape[1]})",
            )
    objectives.get(config).validate()



# =========================================================================== 1. setup


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``base_lr * batch / base_batch``, then cosine / linear / constant decay to
    ``min_lr_ratio`` x peak. ``optim.decay_start``: 'warmup_end' runs the decay over the steps after
    the warm-up (MAE's ``lr_sched.py``); 'zero' runs it over all ``total_steps`` from step 0 and lets
    the warm-up replace its start (BERT's ``optimization.py``: polynomial decay of the global step);
    'zero_scaled' runs it from step 0 and multiplies it by the warm-up ramp min(1, step / warmup)
    (ELECTRA's ``optimization.py``). ``optim.warmup_linspace``: the ramp is numpy.linspace(0, peak,
    warmup), peak at step warmup - 1 (the ``cosine_scheduler`` of BEiT, DINO and VideoMAE)."""
    o = config.optim
    peak = config_lib.lr(config)
    floor = peak * o.min_lr_ratio
    start = o.warmup_steps if o.decay_start == "warmup_end" else 0
    decay_steps = max(config.total_steps - start, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not o.warmup_steps:
        return decay
    if o.decay_start == "zero_scaled":
        return lambda step: decay(step) * jnp.minimum(1.0, step / o.warmup_steps)
    ramp = o.warmup_steps - 1 if o.warmup_linspace else o.warmup_steps
    warmup = optax.linear_schedule(0.0, peak, ramp) if ramp > 0 else optax.constant_schedule(0.0)
    if start:
        return optax.join_schedules([warmup, decay], [o.warmup_steps])
    return lambda step: jnp.where(step < o.warmup_steps, warmup(step), decay(step))


def decay_mask(roles: Any, decay_roles) -> Any:
    """True where a parameter is weight-decayed: its role (``layers.ROLES``, set where the parameter is
    created) is one of ``decay_roles`` (``optim.decay_roles``). Biases, norms, cls/mask tokens, position
    tables and temperatures are never decayed in the published recipes; kernels always are; token
    embedding tables as each recipe's official code does (BERT decays them, and its position tables)."""
    decay_roles = frozenset(decay_roles) - {"statistic"}  # never trained, so never decayed
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scales every gradient by max_norm / max(norm, max_norm), the global norm over all of them: the
    formula of ``tf.clip_by_global_norm`` (Google's BERT) and ``torch.nn.utils.clip_grad_norm_``, with
    optax's (empty) state. One scalar factor, because XLA fuses a multiply into each consumer of the
    clipped gradients (Adam's two moments) but writes out and rereads a per-element division, which is
    how ``optax.clip_by_global_norm`` clips. ``grad_norm=`` (an extra argument of ``update``, passed on
    by ``optax.chain``): the norm when the caller has it already, saving a pass over the gradients."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = max_norm / jnp.maximum(norm, max_norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(config, roles: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (with global-norm clipping when ``optim.clip_norm`` > 0) and its LR schedule. ``roles``:
    the tree of parameter roles (:func:`maskjax.models.layers.param_roles`). ``optim.bias_correction``
    False gives BERT's variant; either way the chain is optax.adamw's, so the state layout is one."""
    o = config.optim
    schedule = learning_rate_schedule(config)
    parts = [clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
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
    rules: tuple  # logical name -> mesh axes (sharding.RULES with config.sharding_rules)
    # The objective's teacher (objectives.base.Teacher; None: none), its module's graph, logical names
    # and roles: its parameters are ``state['teacher']``.
    teacher: Any = None
    teacher_graphdef: Any = None
    teacher_axes: Any = None
    teacher_roles: Any = None

    def activations(self):
        """The context a model runs in: its activations constrained on this run's mesh and rules."""
        return sharding.activation_mesh(self.mesh, self.rules)

    def jit_model_call(self, fn: Callable, teacher: Any = None) -> Callable:
        """``fn(model, *args)`` as a jitted ``(params, *args)``: the model merged from ``params``, its
        activations constrained on the run's mesh, the output replicated on every process (evaluation,
        sampling: anything that reads a result on the host). With ``teacher`` (the parameters
        ``state['teacher']`` holds; objectives whose ``eval_teacher`` is set: a frozen tokenizer),
        ``fn(model, *args, teacher=module)``; the parameters are an argument, not a constant XLA folds."""
        def call(params, teacher_params, *args):
            with self.activations():
                extra = {} if teacher_params is None else {"teacher": nnx.merge(self.teacher_graphdef, teacher_params)}
                return fn(nnx.merge(self.graphdef, params), *args, **extra)

        jitted = jax.jit(call, out_shardings=sharding.replicated(self.mesh))
        return lambda params, *args: jitted(params, teacher, *args)

    @property
    def evaluates_with_teacher(self) -> bool:
        """Whether evaluation and sampling read the teacher (the objective's ``eval_teacher``)."""
        return self.teacher is not None and self.objective.eval_teacher

    def eval_teacher(self, state_teacher: Any) -> Any:
        """The teacher parameters evaluation and sampling pass to the objective (``state['teacher']``
        where :attr:`evaluates_with_teacher`, else None)."""
        return state_teacher if self.evaluates_with_teacher else None

    def global_batch(self, local_batch: dict, also: tuple[str, ...] = ()) -> dict:
        """Host-local rows -> global jax.Arrays sharded over data x fsdp (multi-process safe): the keys of
        the objective's batch spec, plus ``also`` (e.g. the labels an evaluator adds)."""
        shardings = {**self.batch_shardings,
                     **{k: sharding.batch_sharding(self.mesh, np.ndim(local_batch[k])) for k in also}}
        return {
            k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in local_batch.items() if k in shardings
        }

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs of a global batch with the step's shardings (nothing allocated)."""
        return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=self.batch_shardings[k])
                for k, (shape, dtype) in self.objective.batch_spec().items()}

    def rows(self, batch_size: int):
        """The rows of a global batch of ``batch_size`` this process loads (``sharding.process_rows``)."""
        return sharding.process_rows(self.mesh, batch_size)


def loss_and_grads(objective, graphdef, params, batch: dict, key: jax.Array, step: jax.Array, teacher=None):
    """((loss, metrics), gradients) of the objective's loss at ``params``; the loss is always among the
    metrics, whatever else the objective logs. ``teacher``: (graphdef, parameters) of the teacher, for
    objectives that declare one (merged inside the differentiated function, as a constant: no gradient
    reaches it)."""
    def loss_fn(p):
        extra = () if teacher is None else (nnx.merge(*teacher),)
        loss, metrics = objective.loss(nnx.merge(graphdef, p), batch, key, step, *extra)
        return loss, {**metrics, "loss": loss}

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: dict, batch: dict, *, objective, graphdef, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, key: jax.Array, accum: int, skip_nonfinite: bool,
               mesh: jax.sharding.Mesh, rules: tuple, teacher=None, teacher_graphdef=None) -> tuple[dict, dict]:
    """One optimizer step: ``(state, global batch) -> (state, metrics)``, pure (:func:`build` jits it
    with the state donated). ``key``: the run's training key (the step's key is folded from it);
    ``accum``: micro-batches; ``skip_nonfinite``: go on after a non-finite step ('skip') instead of
    latching the state until the host stops the run ('stop'). ``teacher``: the objective's
    :class:`objectives.base.Teacher` (its parameters are ``state['teacher']``; an EMA one moves after
    each applied update, in this step)."""
    with sharding.activation_mesh(mesh, rules):
        step = state["step"]
        key = jax.random.fold_in(key, step)
        params = state["params"]
        model_teacher = None if teacher is None else (teacher_graphdef, state["teacher"])
        if accum == 1:
            (_, metrics), grads = loss_and_grads(objective, graphdef, params, batch, key, step, model_teacher)
        else:
            # Micro-batch i takes rows i, i + accum, i + 2 accum, ...: each device's contiguous block of
            # the batch contributes to every micro-batch, so no rows move between devices (contiguous
            # blocks put each micro-batch on a subset of devices and cost all-gathers and permutes).
            size = next(iter(batch.values())).shape[0]
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), batch)
            # Every micro-batch gets the step's key and its rows' indices in the full batch, so
            # per-example draws (objectives.base.example_keys) are the full batch's draws.
            micro[objectives.base.ROW] = jnp.arange(size, dtype=jnp.int32).reshape(-1, accum).T

            def body(total, mb):
                out = loss_and_grads(objective, graphdef, params, mb, key, step, model_teacher)
                return jax.tree.map(jnp.add, total, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda: loss_and_grads(objective, graphdef, params, first, key, step,
                                                           model_teacher))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            total, _ = jax.lax.scan(body, zeros, micro)
            (_, metrics), grads = jax.tree.map(lambda x: x / accum, total)
        metrics = dict(metrics)
        stats = metrics.pop(objectives.base.STATS, None)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient never reaches the state: the update runs under a cond and the
        # step leaves params and optimizer state as they were (finite gradients give finite Adam updates,
        # and a global norm that overflows is not finite). 'stop' also latches: after the first bad step
        # nothing changes until the host stops the run. (A cond instead of a select over the new and
        # old state saves three passes over the parameters and moments: 2.5% of a ViT-B step on CPU.)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        apply = finite if skip_nonfinite else finite & (state["skipped"] == 0)

        ema = teacher is not None and teacher.ema

        def update(params, opt_state, teacher_params):
            updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
            params = optax.apply_updates(params, updates)
            if objective.after_update is not None:
                params = objective.after_update(params, stats, jax.random.fold_in(key, 1 << 20), step)
            if ema:  # float32 teacher += rate * (student - teacher), rate = 1 - decay at update step + 1
                rate = teacher.rate(step + 1)
                teacher_params = jax.tree.map(lambda t, s: t + rate * (s - t), teacher_params, teacher.source(params))
            return params, opt_state, teacher_params

        out = jax.lax.cond(apply, update, lambda *a: a, params, state["opt_state"], state.get("teacher"))
        new_params, opt_state, new_teacher = out
        metrics.update(grad_norm=grad_norm, param_norm=optax.tree.norm(new_params), learning_rate=schedule(step))
        if ema:
            metrics["teacher_decay"] = 1.0 - teacher.rate(step + 1)
        skipped = state["skipped"] + (~apply).astype(jnp.int32)
        metrics.update(nonfinite=(~finite).astype(jnp.int32), skipped_steps=skipped)
        new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state, "skipped": skipped}
        if teacher is not None:
            new_state["teacher"] = new_teacher
        return new_state, metrics


def build(config, devices=None) -> Setup:
    """Validates ``config`` against the devices and builds the sharded, jitted training functions."""
    devices = list(jax.devices() if devices is None else devices)
    validate(config, num_devices=len(devices))
    objective = objectives.get(config)
    try:
        mesh = sharding.make_mesh(dict(config.mesh), devices, dict(config.mesh_dcn))
    except sharding.MeshError as err:
        raise config_lib.ConfigError("mesh_dcn", str(err)) from None
    seed_key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(seed_key)
    teacher_key = jax.random.fold_in(init_key, 1)  # a random frozen teacher is not the student's initialisation

    abstract_model = nnx.eval_shape(lambda: objective.build(nnx.Rngs(params=init_key)))
    graphdef, abstract_params_state = nnx.split(abstract_model)
    param_axes = sharding.logical_axes(abstract_params_state)
    param_roles = layers.param_roles(abstract_params_state)
    optimizer, schedule = make_optimizer(config, param_roles)

    def init_params(key):
        return nnx.to_pure_dict(nnx.state(objective.build(nnx.Rngs(params=key))))

    teacher = objective.teacher()
    teacher_graphdef = teacher_axes = teacher_roles = None
    if teacher is not None:
        teacher_graphdef, abstract_teacher = nnx.split(nnx.eval_shape(lambda: teacher.build(nnx.Rngs(params=init_key))))
        teacher_axes = sharding.logical_axes(abstract_teacher)
        teacher_roles = layers.param_roles(abstract_teacher)
        if teacher.ema:
            _check_same_tree(f"the teacher of {config.objective!r}", nnx.to_pure_dict(abstract_teacher),
                             teacher.source(nnx.to_pure_dict(abstract_params_state)))

    def init_state():
        params = init_params(init_key)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
                 "skipped": jnp.zeros((), jnp.int32)}
        if teacher is not None:  # an EMA teacher starts as the student; a saved one is loaded below
            state["teacher"] = (jax.tree.map(jnp.copy, teacher.source(params)) if teacher.ema else
                                nnx.to_pure_dict(nnx.state(teacher.build(nnx.Rngs(params=teacher_key)))))
        return state

    abstract = jax.eval_shape(init_state)
    state_axes = {
        "step": sharding.Names(),
        "skipped": sharding.Names(),
        "params": param_axes,
        "opt_state": _opt_state_axes(abstract["opt_state"], param_axes),
    }
    if teacher is not None:
        state_axes["teacher"] = teacher_axes
    rules = sharding.rules_with(config.sharding_rules)
    state_shardings = sharding.tree_shardings(abstract, state_axes, mesh, rules)
    with sharding.activation_mesh(mesh, rules):
        init_fn = jax.jit(init_state, out_shardings=state_shardings)
    if teacher is not None and (teacher.workdir or teacher.hf):
        init_fn = functools.partial(_with_saved_teacher, init_fn, teacher, abstract["teacher"],
                                    state_shardings["teacher"], config.objective)

    spec = objective.batch_spec()
    batch_shardings = {k: sharding.batch_sharding(mesh, len(shape)) for k, (shape, _) in spec.items()}
    step = functools.partial(train_step, objective=objective, graphdef=graphdef, optimizer=optimizer,
                             schedule=schedule, key=train_key, accum=config.optim.grad_accum,
                             skip_nonfinite=config.faults.nonfinite == "skip", mesh=mesh, rules=rules,
                             teacher=teacher, teacher_graphdef=teacher_graphdef)
    step_fn = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Setup(
        config=config, objective=objective, mesh=mesh, graphdef=graphdef, param_axes=param_axes, param_roles=param_roles,
        state_shardings=state_shardings,
        abstract_state=ckpt_lib.abstract_with_shardings(abstract, state_shardings),
        optimizer=optimizer, schedule=schedule, init_fn=init_fn, step_fn=step_fn, batch_shardings=batch_shardings,
        rules=rules, teacher=teacher, teacher_graphdef=teacher_graphdef, teacher_axes=teacher_axes,
        teacher_roles=teacher_roles,
    )


def _check_same_tree(what: str, tree: Any, expected: Any, labels=("in the teacher", "in the student it follows"),
                     error=TypeError) -> None:
    """Raises ``error`` naming the first parameter where ``tree`` and ``expected`` (arrays) differ in shape."""
    mine = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    theirs = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    for name in sorted(mine.keys() | theirs.keys()):
        if mine.get(name) != theirs.get(name):
            raise error(f"{what}: parameter {name} is {mine.get(name)} {labels[0]}, {theirs.get(name)} {labels[1]}")


def saved_params(workdir: str, step: int = 0, path: tuple[str, ...] = (), source=None) -> tuple[dict, int]:
    """(host parameters under ``path`` of the run in ``workdir`` at checkpoint ``step`` (0: the newest),
    the step): a partial restore of that run's own parameter tree, nothing else. ``source``: that run's
    config (read from its ``config.json`` when None). Errors name the workdir and what is missing."""
    from jax.sharding import SingleDeviceSharding

    if source is None:
        try:
            source = objectives.saved_config(workdir, "teacher")
        except ConfigError as err:
            raise ckpt_lib.CheckpointError(f"teacher workdir: {err.message}") from None
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        chosen = step or (max(steps) if steps else None)
        if chosen not in steps:
            raise ckpt_lib.CheckpointError(f"teacher workdir {workdir!r} has no checkpoint"
                                           + (f" at step {step} (it has {steps})" if step else ""))
        device = SingleDeviceSharding(jax.local_devices()[0])
        shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
            lambda: objectives.get(source).build(nnx.Rngs(params=jax.random.key(0))))))
        abstract = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)}
        params = ckpt.restore_params(chosen, abstract)
    finally:
        ckpt.close()
    for key in path:
        if key not in params:
            raise ckpt_lib.CheckpointError(f"teacher workdir {workdir!r}: its parameters have no {'/'.join(path)!r}")
        params = params[key]
    return jax.tree.map(np.asarray, params), chosen


def imported_params(config, path: str, subtree: tuple[str, ...] = ()) -> dict:
    """Host parameters under ``subtree`` of a run of ``config`` initialised from the transformers directory
    (or .npz) ``path`` by maskjax's import (:func:`maskjax.export.import_params`, the ``init_from`` path):
    every tensor the file has for the run; the rest stays at its seeded initialisation."""
    from maskjax import export

    fresh = nnx.to_pure_dict(nnx.state(objectives.get(config).build(nnx.Rngs(params=jax.random.key(config.seed)))))
    params, _ = export.import_params(config, jax.tree.map(np.asarray, fresh), path)
    for key in subtree:
        params = params[key]
    return params


def _with_saved_teacher(init_fn: Callable, teacher, abstract: Any, shardings: Any, objective: str) -> dict:
    """``init_fn()`` with ``state['teacher']`` the saved run's parameters (``teacher.workdir``) or the
    imported transformers model's (``teacher.hf``), each device getting its shard (multi-process safe)."""
    state = init_fn()
    if teacher.hf:
        host, source = imported_params(teacher.source_config, teacher.hf, teacher.path), teacher.hf
    else:
        (host, _), source = (saved_params(teacher.workdir, teacher.step, teacher.path, teacher.source_config),
                             teacher.workdir)
    _check_same_tree(f"the teacher of {objective!r} from {source!r}", host, abstract,
                     ("there", "in the teacher this config builds"), ckpt_lib.CheckpointError)
    state["teacher"] = sharded(jax.tree.map(lambda x, a: np.asarray(x, a.dtype), host, abstract), shardings)
    return state


def sharded(host: Any, shardings: Any) -> Any:
    """Host arrays placed as global arrays with ``shardings``; every process holds the whole arrays and
    each device takes its own shard (multi-process safe)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                        host, shardings)


def init_params_fn(setup: Setup, key: jax.Array) -> Any:
    """Freshly initialised parameters (sharded) for ``key``: the random-init baseline of probes."""
    build_fn = lambda: nnx.to_pure_dict(nnx.state(setup.objective.build(nnx.Rngs(params=key))))
    with setup.activations():
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
    return dict(state, params=sharded(params, setup.state_shardings["params"])), report
