"""The one trainer: sharded state, one jitted train step, the loop, checkpoints and evaluation.

The setup and the jitted step are :mod:`maskjax.step`; this module is the loop: the host feeds
batches, logs every ``log_every`` steps, saves asynchronously and evaluates.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from maskjax import checkpoint as ckpt_lib
from maskjax import config as config_lib
from maskjax import metrics as metrics_lib
from maskjax import distributed, faults
from maskjax import data
from maskjax.step import Setup, build, initialize_from

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
    policy = config.faults.to_dict()
    loader = data.train_loader(config, setup.rows(config.batch_size), kind=setup.objective.data_kind)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                         checksum=config.checkpoint.checksum)
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
