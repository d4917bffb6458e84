"""Where a run's wall-clock went, summed over every restart of the same workdir.

Each run (one ``maskjax train`` process, or a set of them in a multi-process run) times its start-up
(build, data loader, everything before the first step except the checkpoint restore), the checkpoint
restore and saves (the blocking part: device-to-host copy, waiting for the previous save, the final
commit), the first step (tracing and compilation), the host waiting for batches, evaluations, and the
train steps (the rest). Process 0 keeps that breakdown in its own ``runs.jsonl`` record (``seconds``), refreshed at
every log step, so a run that is killed has left its account up to its last log step.

:func:`summarize` adds the runs up. Steps that a killed run computed after its last checkpoint are
done again by the next run: their share of the killed run's step time, and the start-up, restore and
compilation of every run after the first, are *lost to restarts*. Goodput is the step time that was
not lost, over all the wall-clock. Time after a run's last record (less than one log interval) is not
seen by anyone and is not counted.
"""
from __future__ import annotations

import contextlib
import json
import time

from maskjax import metrics, storage

PARTS = ("startup", "restore", "compile", "data", "checkpoint", "eval")  # "steps" is the rest of the wall-clock
LABELS = {"compile": "compile", "checkpoint": "checkpoints", "restore": "restore", "eval": "eval", "data": "data",
          "startup": "start-up", "lost": "lost to restarts"}


class Clock:
    """Seconds per part of one run; ``steps`` = wall-clock minus the timed parts."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._open: str | None = "startup"  # until the first step starts
        self._since = self.started

    @contextlib.contextmanager
    def timing(self, part: str):
        """Charges the block to ``part`` (a block inside start-up is taken out of start-up)."""
        outer, begun = self._open, time.perf_counter()
        if outer is not None:
            self.seconds[outer] += begun - self._since
        self._open = None
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[part] += now - begun
            self._open, self._since = outer, now

    def started_steps(self) -> None:
        """Start-up ends: the first train step is about to be called."""
        if self._open == "startup":
            self.seconds["startup"] += time.perf_counter() - self._since
            self._open = None

    def snapshot(self, start_step: int, last_step: int) -> dict:
        wall = time.perf_counter() - self.started
        seconds = dict(self.seconds)
        if self._open is not None:
            seconds[self._open] += time.perf_counter() - self._since
        seconds["steps"] = max(wall - sum(seconds.values()), 0.0)
        return {"wall": wall, "start_step": start_step, "last_step": last_step,
                **{k: round(v, 4) for k, v in seconds.items()}}

    def fractions(self, start_step: int, last_step: int) -> dict:
        """``goodput`` and ``time/PART`` of this run so far, as fractions of its wall-clock (metrics)."""
        snap = self.snapshot(start_step, last_step)
        wall = max(snap["wall"], 1e-9)
        return {"goodput": snap["steps"] / wall, **{f"time/{p}": snap[p] / wall for p in PARTS}}


def summarize(runs: list[dict]) -> dict | None:
    """Seconds per part over the runs of a workdir (``runs.jsonl`` records, oldest first), steps lost to
    restarts moved into ``lost``; None when no run has an account yet."""
    accounts = [(r.get("start_step", 0), r["seconds"]) for r in runs if isinstance(r.get("seconds"), dict)]
    if not accounts:
        return None
    total = dict.fromkeys(("wall", "steps", "lost", *PARTS), 0.0)
    for i, (start, t) in enumerate(accounts):
        for key in ("wall", "steps", *PARTS):
            total[key] += t.get(key, 0.0)
        if i:  # a restart: everything before its first step was spent because an earlier run stopped
            for key in ("startup", "restore", "compile"):
                total["lost"] += t.get(key, 0.0)
                total[key] -= t.get(key, 0.0)
        if i + 1 < len(accounts):
            resumed_at = accounts[i + 1][0]
            done = t.get("last_step", start) - start
            redone = max(t.get("last_step", start) - max(resumed_at, start), 0)
            if done > 0 and redone:
                seconds = t.get("steps", 0.0) * min(redone / done, 1.0)
                total["lost"] += seconds
                total["steps"] -= seconds
    total["runs"] = len(accounts)
    total["goodput"] = total["steps"] / max(total["wall"], 1e-9)
    return total


def line(total: dict) -> str:
    """'goodput 93.1% of 1h02m over 3 runs: compile 2.0%, checkpoints 1.1%, ...' (largest loss first)."""
    wall = max(total["wall"], 1e-9)
    parts = sorted(((total[k] / wall, LABELS[k]) for k in (*PARTS, "lost")), reverse=True)
    runs = f" over {total['runs']} runs" if total["runs"] > 1 else ""
    return (f"goodput {100 * total['goodput']:.1f}% of {metrics.format_seconds(wall)}{runs}: "
            + ", ".join(f"{label} {100 * share:.1f}%" for share, label in parts))


class RunLog:
    """``runs.jsonl``: one record per start that wrote in the workdir (time, start step, config), this
    run's record carrying its :class:`Clock` account, rewritten in place (atomically; on an object store
    at most every ``flush_secs`` unless forced)."""

    def __init__(self, workdir: str, record: dict, flush_secs: float = 30.0):
        self.path = storage.join(workdir, "runs.jsonl")
        self.earlier = metrics.read_jsonl(self.path) if storage.exists(self.path) else []
        self._earlier_text = "".join(json.dumps(r, default=str) + "\n" for r in self.earlier)  # once, not per log
        self.record = record
        self.flush_secs = flush_secs if storage.remote(workdir) else 0.0
        self._written = float("-inf")
        self.update(None, force=True)

    def update(self, account: dict | None, force: bool = False) -> None:
        if account is not None:
            self.record["seconds"] = account
        if not force and time.monotonic() - self._written < self.flush_secs:
            return
        storage.write_text(self.path, self._earlier_text + json.dumps(self.record, default=str) + "\n")
        self._written = time.monotonic()

    def total(self) -> dict | None:
        return summarize([*self.earlier, self.record])
