"""What a run does when something goes wrong: exit statuses, preemption, non-finite steps, fault injection.

Exit statuses of ``maskjax`` (schedulers can act on them):

====  ===========================================================================================
 0    done
 1    an unexpected error (a bug: the one line says ``rerun with --debug``)
 2    bad input: config, flag, dataset, record, file, checkpoint; names the offending thing
 3    a peer process of a multi-process run was lost (:class:`maskjax.distributed.PeerLost`)
 4    ``compile-check``: the step does not fit in device memory
 5    stopped on a non-finite loss or gradient (``faults.nonfinite='stop'``); the last good state is saved
 6    an object store (``gs://`` workdir or data) could not be reached or refused a request; what was
      committed before (checkpoints, flushed metrics) is intact: run the same command again once it is back
 75   preempted (SIGTERM or the platform's preemption notice); a checkpoint of the current step is
      committed: run the same command again to resume (EX_TEMPFAIL: "try again")
====  ===========================================================================================

Fault injection (tests, and anyone who wants to see recovery work): ``MASKJAX_FAULTS`` is a comma-separated
list of ``ACTION@POINT:N`` (``ACTION@POINT:N:pK``: on process K only). Named places call :func:`point`;
when ``N`` matches, ``ACTION`` happens for real: ``kill`` sends SIGKILL to this process, ``term`` sends
SIGTERM, ``stop`` sends SIGSTOP (the test does something, e.g. stops a storage server, then sends SIGCONT),
``nan`` makes the caller poison its data. ``N`` is the step for points that have one (``step``,
``checkpoint``, ``batch``) and otherwise the how-many-th time this process reaches the point (``compile``,
``eval``). The training loop itself has no fault branches: :func:`inject` wraps its loader and step
function when ``MASKJAX_FAULTS`` is set, and returns them unchanged otherwise.
"""
from __future__ import annotations

import os
import signal
import threading

from maskjax.errors import MaskjaxError

EXIT_NONFINITE = 5
EXIT_PREEMPTED = 75

POINTS = {
    "compile": "before the first train step is compiled and run",
    "step": "right after step N is dispatched, while the device runs it",
    "checkpoint": "right after the asynchronous save of step N starts, while it is being written",
    "batch": "the host batch of step N (only 'nan': its floating-point arrays become NaN)",
    "eval": "inside an evaluation pass",
}
ACTIONS = ("kill", "term", "stop", "nan")


class Preempted(MaskjaxError):
    """The run stopped on a preemption notice after committing a checkpoint of ``step``."""

    exit_status = EXIT_PREEMPTED

    def __init__(self, step: int, directory: str, source: str):
        super().__init__(f"preempted ({source}) at step {step}: checkpoint step {step} is committed in {directory}; "
                         "run the same command again to resume")
        self.step = step


class NonFiniteError(MaskjaxError, FloatingPointError):
    """A non-finite loss or gradient under ``faults.nonfinite='stop'`` (or too many skipped steps)."""

    exit_status = EXIT_NONFINITE


class FaultSpecError(MaskjaxError, ValueError):
    pass


def _parse(text: str, process: int = 0) -> dict[tuple[str, str], set[int]]:
    """``ACTION@POINT:N`` items, or ``ACTION@POINT:N:pK`` for process K of a multi-process run only."""
    spec: dict[tuple[str, str], set[int]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        action, _, rest = item.partition("@")
        name, _, count = rest.partition(":")
        count, _, only = count.partition(":")
        if action not in ACTIONS or name not in POINTS or not count.isdigit() \
                or (only and not (only.startswith("p") and only[1:].isdigit())):
            raise FaultSpecError(f"MASKJAX_FAULTS item {item!r}: expected ACTION@POINT:N[:pPROCESS] with ACTION in "
                                 f"{ACTIONS} and POINT in {tuple(POINTS)}")
        if not only or int(only[1:]) == process:
            spec.setdefault((action, name), set()).add(int(count))
    return spec


_hits: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str, step: int | None = None) -> set[str]:
    """Marks reaching ``name``; performs a matching ``kill``/``term`` and returns the other matching actions."""
    text = os.environ.get("MASKJAX_FAULTS", "")
    if not text:
        return set()
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        n = _hits[name] if step is None else step
    import jax

    actions = {action for (action, where), counts in _parse(text, jax.process_index()).items()
               if where == name and n in counts}
    if "kill" in actions:
        os.kill(os.getpid(), signal.SIGKILL)
    if "term" in actions:
        os.kill(os.getpid(), signal.SIGTERM)
    if "stop" in actions:
        os.kill(os.getpid(), signal.SIGSTOP)
    return actions - {"kill", "term", "stop"}


def inject(loader, step_fn, start: int):
    """(loader, step_fn) with the ``compile``, ``batch`` and ``step`` points of a run starting after step
    ``start``; the originals when ``MASKJAX_FAULTS`` is empty (a run without faults pays nothing)."""
    if not os.environ.get("MASKJAX_FAULTS", ""):
        return loader, step_fn
    return _FaultyLoader(loader, start), _FaultyStep(step_fn, start)


class _FaultyLoader:
    """The loader, with ``nan@batch:N`` poisoning the floating-point arrays of step N's host batch."""

    def __init__(self, loader, start: int):
        self._loader, self._step = loader, start

    def __next__(self) -> dict:
        import numpy as np

        batch = next(self._loader)
        self._step += 1
        if "nan" in point("batch", self._step):
            batch = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in batch.items()}
        return batch

    def __getattr__(self, name):  # get_state, set_state, close, bad_records: the loader's own
        return getattr(self._loader, name)


class _FaultyStep:
    """The step function, with ``compile`` before its first call and ``step`` after each dispatch."""

    def __init__(self, step_fn, start: int):
        self._step_fn, self._start, self._step = step_fn, start, start

    def __call__(self, state, batch):
        if self._step == self._start:
            point("compile")
        out = self._step_fn(state, batch)
        self._step += 1
        point("step", self._step)
        return out


def check_spec() -> None:
    """Raises :class:`FaultSpecError` for a malformed ``MASKJAX_FAULTS`` (before a run starts)."""
    _parse(os.environ.get("MASKJAX_FAULTS", ""))


class Preemption:
    """Did a preemption notice arrive? Asked once per step with the same step on every process.

    Multi-process: JAX's preemption sync manager (started by ``jax.distributed.initialize``; it
    catches SIGTERM and, on Cloud TPU, the maintenance notice) makes every process see the notice at the
    same step, so all save the same checkpoint. One process: a SIGTERM handler sets a flag. The handler
    is removed by :meth:`close`, so a SIGTERM outside the training loop stops the process as usual.
    """

    def __init__(self):
        import jax

        self.source = "SIGTERM"
        self._flag = threading.Event()
        self._previous = None
        self._sync = False
        if jax.process_count() > 1:
            from jax._src import distributed as jax_distributed

            self._sync = getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
            self.source = "preemption notice"
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        if self._sync:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
