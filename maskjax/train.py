"""The one trainer: sharded state, one jitted train step, the loop, checkpoints and evaluation.

The setup and the jitted step are :mod:`maskjax.step`; this module is the loop: the host feeds
batches, logs every ``log_every`` steps, saves asynchronously and evaluates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import jax
import numpy as np

from maskjax import checkpoint as ckpt_lib
from maskjax import config as config_lib
from maskjax import metrics as metrics_lib
from maskjax import distributed, faults, goodput, storage
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
    clock = goodput.Clock()
    faults.check_spec()
    distributed.check_same(config)  # every process: same config, same code
    setup = build(config, devices)  # validation happens here, before anything is written
    is_writer = jax.process_index() == 0
    loader = data.train_loader(config, setup.rows(config.batch_size), kind=setup.objective.data_kind)
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                         checksum=config.checkpoint.checksum)
    with clock.timing("restore"):
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
    policy = Policy.from_config(config, stop_at=stop_at, evaluate=evaluate)
    progress = metrics_lib.Progress(config.total_steps, start, config.batch_size, enabled=is_writer and not quiet)
    runs = None
    if is_writer:
        change = _config_change(workdir, config)
        storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))
        runs = goodput.RunLog(workdir, {"time": time.time(), "start_step": start, "config": config.to_dict(),
                                        "seconds": clock.snapshot(start, start)})
        if change and start:
            progress.message(f"note: the config differs from the previous run in this workdir{change}")
    if start:
        progress.message(f"resumed from step {start} in {checkpointer.directory}")
    elif config.get("init_from"):
        progress.message(init_report)
    batches, step_fn = faults.inject(loader, setup.step_fn, start)
    window = _Window(start, loader.get_state())
    summary: dict = {"start_step": start, "losses": []}
    preemption = faults.Preemption()
    step, saved, done = start, start if restored else None, start
    clock.started_steps()
    try:
        for step in range(start, policy.end):
            with clock.timing("data"):
                batch = setup.global_batch(next(batches))
            with clock.timing("compile") if step == start else contextlib.nullcontext():
                state, step_metrics = step_fn(state, batch)
            done = step + 1
            window.add(done, step_metrics, loader.get_state())
            todo = policy.after(done, preemption.reached(done))
            if todo.check:
                verdict = policy.nonfinite(window.new_rows(), saved, checkpointer.directory)
                with clock.timing("checkpoint"):
                    state, saved = _act(verdict, state, setup, window, checkpointer, progress, saved)
            if todo.log:
                values = window.flush()
                examples_per_sec, seconds_per_step = progress.rate(done)
                values.update(examples_per_sec=examples_per_sec, seconds_per_step=seconds_per_step)
                if policy.count_bad_records:
                    values["bad_records"] = getattr(loader, "bad_records", 0)
                values.update(clock.fractions(start, done))
                writer.scalars(done, values)
                if runs is not None:
                    runs.update(clock.snapshot(start, done))
                progress.show(done, values["loss"], examples_per_sec, seconds_per_step)
                summary["losses"].append((done, values["loss"]))
            if todo.save and saved != done:
                with clock.timing("checkpoint"):
                    checkpointer.save(done, state, loader.get_state())
                    writer.flush()  # the records up to a checkpoint are as durable as it (object stores batch writes)
                saved = done
            if todo.preempted:
                with clock.timing("checkpoint"):
                    checkpointer.wait()
                raise faults.Preempted(done, checkpointer.directory, preemption.source)
            if todo.evaluate:
                with clock.timing("eval"):
                    _evaluate(setup, state, workdir, done, writer, progress)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        # A cross-process collective failed: on CPU (gloo) and GPU (NCCL) a dead peer surfaces here.
        raise distributed.PeerLost(step + 1, checkpointer.latest_step(), err) from err
    except BaseException as err:
        # Not when the store itself failed: a save in flight retries against it (tensorstore: for minutes)
        # and cannot commit, and the account cannot be written either.
        if getattr(err, "exit_status", None) != storage.EXIT_STORAGE:
            if jax.process_count() == 1:  # let a save in flight commit; a half-written one would be discarded
                try:
                    checkpointer.wait()
                except Exception:
                    pass
            _account(runs, clock, start, done)
        raise
    finally:
        preemption.close()
    progress.close()
    loader.close()
    with clock.timing("checkpoint"):
        checkpointer.close()
    end = policy.end
    summary["end_step"] = end
    if evaluate and end == config.total_steps and (end > start or not _has_eval(workdir, end)):
        with clock.timing("eval"):
            summary["eval"] = _evaluate(setup, state, workdir, end, writer, progress)
    writer.close()
    summary["goodput"] = _account(runs, clock, start, end)
    if summary["goodput"] is not None:
        progress.message(goodput.line(summary["goodput"]))
    summary["state"] = state
    return summary


def _account(runs, clock, start: int, last_step: int) -> dict | None:
    """Writes this run's final account into runs.jsonl (best effort when leaving on an error: the
    store may be what failed); the workdir's total over its runs."""
    if runs is None:
        return None
    try:
        runs.update(clock.snapshot(start, last_step), force=True)
    except Exception:
        return None
    return runs.total()


# =========================================================================== the policy


@dataclasses.dataclass(frozen=True)
class Todo:
    """What the loop does after a step."""

    log: bool = False
    save: bool = False
    evaluate: bool = False
    preempted: bool = False  # stop with faults.Preempted once the checkpoint of this step is committed

    @property
    def check(self) -> bool:
        """Fetch the window's metrics and look for non-finite steps (the host waits for the device)."""
        return self.log or self.save


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do about the non-finite steps found in a window: report ``messages``; checkpoint step
    ``save`` (``rewind``: the state is the one latched before the first bad step, so its step counter is
    set back to ``save``); stop with ``faults.NonFiniteError(error)``."""

    messages: tuple[str, ...] = ()
    save: int | None = None
    rewind: bool = False
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Cadence (log, checkpoint, evaluate), preemption and the non-finite policy of a run, as decisions
    the loop carries out; it reads nothing but its arguments (tests call it directly)."""

    end: int
    total_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int  # 0: only at the end
    nonfinite_mode: str  # 'stop' or 'skip' (faults.nonfinite)
    max_skipped: int  # 0: no limit
    count_bad_records: bool

    @classmethod
    def from_config(cls, config, stop_at: int | None = None, evaluate: bool = True) -> "Policy":
        f = config.faults
        return cls(end=config.total_steps if stop_at is None else min(stop_at, config.total_steps),
                   total_steps=config.total_steps, log_every=config.log_every,
                   checkpoint_every=config.checkpoint.every, eval_every=config.eval_every if evaluate else 0,
                   nonfinite_mode=f.nonfinite, max_skipped=f.max_skipped_steps,
                   count_bad_records=f.bad_records == "skip")

    def after(self, done: int, preempted: bool = False) -> Todo:
        last = done == self.end
        return Todo(log=done % self.log_every == 0 or last,
                    save=done % self.checkpoint_every == 0 or last or preempted,
                    evaluate=bool(self.eval_every) and done % self.eval_every == 0 and done != self.total_steps,
                    preempted=preempted)

    def nonfinite(self, rows: "Rows", saved: int | None, directory: str) -> Verdict:
        """The verdict on the steps of ``rows`` (fetched since the last check); ``saved``: the newest
        checkpoint step started; ``directory``: where checkpoints go (for the messages)."""
        bad = [(s, m) for s, m in rows.metrics if m["nonfinite"]]
        if not bad:
            return Verdict()
        first, m = bad[0]
        what = f"loss {m['loss']:.4g}, grad_norm {m['grad_norm']:.4g}, param_norm {m['param_norm']:.4g}"
        skipped = int(rows.metrics[-1][1]["skipped_steps"])
        if self.nonfinite_mode == "skip":
            messages = tuple(f"step {s}: non-finite loss or gradient; update skipped ({skipped} skipped so far)"
                             for s, _ in bad)
            if not self.max_skipped or skipped <= self.max_skipped:
                return Verdict(messages=messages)
            done = rows.last
            return Verdict(messages=messages, save=done if saved != done else None, error=(
                f"{skipped} steps had non-finite values, more than faults.max_skipped_steps={self.max_skipped} (the "
                f"last at step {bad[-1][0]}: {what}); checkpoint step {done} in {directory} holds only good updates"))
        good = first - 1  # 'stop' latched the state at the step before the first bad one
        save = good if good > 0 and saved != good else None
        assert save is None or good >= rows.checked, (good, rows.checked)
        note = (f"the last good state is checkpoint step {good} in {directory}" if good > 0
                else "no update was applied")
        return Verdict(save=save, rewind=True, error=(
            f"non-finite loss or gradient at step {first} ({what}); {note}; to go on, lower the learning rate, add "
            "optim.clip_norm, or set faults.nonfinite=skip"))


@dataclasses.dataclass(frozen=True)
class Rows:
    """The metrics of the steps after ``checked`` up to ``last``, fetched to the host."""

    checked: int
    last: int
    metrics: list


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

    def new_rows(self) -> Rows:
        """The fetched metrics of the steps since the last call; loader positions before them are dropped
        (the 'stop' verdict saves the state before the first new bad step, never an older one)."""
        rows = self.fetch()
        new = Rows(checked=self.checked, last=rows[-1][0] if rows else self.checked,
                   metrics=[(s, m) for s, m in rows if s > self.checked])
        self.checked = new.last
        self.loader_states = {s: v for s, v in self.loader_states.items() if s >= new.checked}
        return new

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


def _act(verdict: Verdict, state, setup: Setup, window: _Window, checkpointer, progress, saved):
    """Carries out a non-finite verdict: returns (state, newest checkpoint step started) or raises."""
    for message in verdict.messages:
        progress.message(message)
    if verdict.save is not None:
        if verdict.rewind:
            fixed = lambda value, sharding: jax.make_array_from_callback((), sharding, lambda _: np.int32(value))
            state = dict(state, step=fixed(verdict.save, setup.state_shardings["step"]),
                         skipped=fixed(0, setup.state_shardings["skipped"]))
        checkpointer.save(verdict.save, state, window.loader_states[verdict.save])
        saved = verdict.save
    if verdict.error:
        checkpointer.wait()
        raise faults.NonFiniteError(verdict.error)
    return state, saved


def _has_eval(workdir: str, step: int) -> bool:
    try:
        return json.loads(storage.read_text(storage.join(workdir, "eval.json"))).get("step") == step
    except (OSError, ValueError):
        return False


def _config_change(workdir: str, config) -> str:
    """' (model.width: 32 in the run that wrote it, 64 now; ...)' against ``workdir/config.json``, or ''."""
    try:
        before = json.loads(storage.read_text(storage.join(workdir, "config.json")))
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


def _evaluate(setup: Setup, state: dict, workdir: str, step: int, writer, progress) -> dict:
    from maskjax import evaluate as eval_lib

    started = time.perf_counter()
    results = eval_lib.run(setup, state["params"], workdir, step, writer,
                           teacher=setup.eval_teacher(state.get("teacher")))
    progress.message(eval_lib.summary_line(results) + f" ({time.perf_counter() - started:.0f}s)")
    return results

