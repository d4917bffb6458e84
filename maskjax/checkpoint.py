"""Orbax checkpoints of the train state together with the data loader position, verified on restore.

Layout: ``workdir/checkpoints/<step>/{state,data,maskjax_checksums.json}``. Saves are asynchronous (the
host only waits for the device-to-host copy). Locally Orbax writes into ``<step>.orbax-checkpoint-tmp-*``
and renames it when complete, so a step directory is never half-written; an interrupted temporary
directory is removed when the next run starts in that workdir (readers, such as eval, export and
teachers, open checkpoints read-only and never remove anything: the "leftover" may be a live run's save).
On an object store (``gs://`` workdir), which cannot rename a directory, Orbax writes the step in place
and commits it with ``commit_success.txt``; a step without it is not a checkpoint. Before the commit,
process 0 records every file's size and digest in ``maskjax_checksums.json`` (SHA-256 locally; the
store's own crc32c/md5 on an object store, from one listing), so a checkpoint damaged later (truncated,
bit-flipped, files lost) is caught before it is restored: :meth:`Checkpointer.restore_newest` moves it to
``workdir/checkpoints_corrupt/`` with a warning that names it and falls back to the previous one. A
checkpoint whose shapes differ from the config (another model) is a :class:`CheckpointError` naming the
first mismatched parameter, never a partial restore.
"""
from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from maskjax import storage
from maskjax.errors import MaskjaxError

CHECKSUMS = "maskjax_checksums.json"
_CONTENT = ("state", "data")  # the items whose files are checksummed


class CheckpointError(MaskjaxError, ValueError):
    """A checkpoint that cannot be used with this config, or cannot be written; names it."""


def checksums(step_dir: str) -> dict[str, list]:
    """``{relative path: [size, digest]}`` of every file of the checkpoint's items (SHA-256 locally, the
    store's own checksum on an object store: :func:`storage.digests`)."""
    out = {}
    for item in _CONTENT:
        for rel, (size, digest) in storage.digests(storage.join(step_dir, item)).items():
            out[f"{item}/{rel}"] = [size, digest]
    return out


def verify(step_dir: str) -> str | None:
    """None when every file matches ``maskjax_checksums.json`` (or there is none), else what is wrong."""
    manifest = storage.join(step_dir, CHECKSUMS)
    if not storage.exists(manifest):
        return None  # written before checksums existed, or synchronously and killed before they were
    try:
        expected = json.loads(storage.read_text(manifest))["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{CHECKSUMS} is unreadable ({type(err).__name__})"
    found = checksums(step_dir)
    for rel, (size, digest) in expected.items():
        if rel not in found:
            return f"file {rel} is missing"
        if found[rel][0] != size:
            return f"file {rel} has {found[rel][0]} bytes, {size} were written"
    for rel, (size, digest) in expected.items():
        if found[rel][1] != (digest if ":" in digest else "sha256:" + digest):  # older manifests: bare SHA-256
            return f"file {rel} does not match its checksum"
    return None


def _path_str(path) -> str:
    """'params/encoder/.../kernel': dict keys, sequence indices and attribute names alike (Orbax stores
    optimizer-state named tuples as dicts)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def shape_mismatch(saved: Any, abstract: Any) -> str | None:
    """The first difference between a checkpoint's array metadata and the state this config builds."""
    have = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    want = dict(sorted(want.items(), key=lambda item: not item[0].startswith("params/")))  # name a parameter
    for name in want:
        if name in have and have[name] != want[name]:
            return f"{name} has shape {have[name]} in the checkpoint and {want[name]} in this config"
    missing = [n for n in want if n not in have]
    if missing:
        return f"{missing[0]} is not in the checkpoint ({len(missing)} arrays of this config are missing)"
    extra = [n for n in have if n not in want]
    if extra:
        return f"the checkpoint has {extra[0]}, which this config does not ({len(extra)} such arrays)"
    return None


def _agree(ok: bool) -> bool:
    """True when ``ok`` on every process (all processes take the same restore decision)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"maskjax: warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, checksum: bool = True,
                 read_only: bool = False):
        """``read_only``: for readers (eval, export, teachers, reports), which must never remove what they
        take for leftovers: a writer's unfinished step (a temporary directory, or on an object store a step
        without its commit marker) may be a live run's save in progress. Only the run that writes cleans
        them up when it starts."""
        self.workdir = storage.absolute(workdir)
        self.directory = storage.join(self.workdir, "checkpoints")
        self.checksum = checksum
        self._saving: int | None = None
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   enable_async_checkpointing=False, save_interval_steps=0)
        else:
            async_options = ocp.AsyncOptions(post_finalization_callback=self._record_checksums) \
                if async_save and checksum else None
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True, async_options=async_options,
            )
        storage.forget_listings(self.directory)  # the manager lists the steps once, now
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._async = async_save

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, loader_state: dict) -> None:
        """Starts saving ``step``; an earlier save still in flight is finished first. A write failure
        (disk full, permissions) is a :class:`CheckpointError` naming the step; older checkpoints stay."""
        from maskjax import faults

        self.wait()  # Orbax would wait for the previous save here anyway; this names its step if it failed
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(loader_state)),
            )
        except Exception as err:
            raise self._write_error(step, err) from err
        if not self._async and self.checksum:
            self._record_checksums(storage.join(self.directory, str(step)))
        faults.point("checkpoint", step)

    def _write_error(self, step, err: Exception) -> CheckpointError:
        text = str(err).strip()
        os_error = re.search(r"([A-Za-z][^:\[\]\"]*) \[os_error_code='(\d+)'\]", text)  # TensorStore's
        if isinstance(err, OSError) and err.strerror:
            reason = f"{err.strerror} [errno {err.errno}]"
        elif os_error:
            reason = f"{os_error.group(1).strip()} [errno {os_error.group(2)}]"
        else:
            reason = f"{type(err).__name__}: {(text.splitlines() or [''])[0][:300]}"
        error = CheckpointError(f"could not write checkpoint step {step} in {self.directory}: {reason}; "
                                "earlier checkpoints are kept")
        if storage.remote(self.directory):
            error.exit_status = storage.EXIT_STORAGE  # the store: run again once it answers
        error.hard_exit = True  # Orbax's writer threads are in a failed state: leave without tearing them down
        return error

    def _record_checksums(self, step_dir: str | None = None) -> None:
        """Runs on Orbax's commit thread after the files are written and before the directory is
        renamed to its step (so a committed checkpoint always has its checksums), on process 0."""
        if jax.process_index() != 0:
            return
        if step_dir is None and storage.remote(self.directory):
            step_dir = storage.join(self.directory, str(self._saving))  # written in place, committed by a marker
        elif step_dir is None:
            # Orbax finishes one save before it starts the next, and removed older leftovers at start.
            pending = [name for name in storage.listdir(self.directory) if ".orbax-checkpoint-tmp" in name]
            if len(pending) != 1:
                warn(f"no checksums for the checkpoint being committed in {self.directory}: {len(pending)} "
                     "temporary directories")
                return
            step_dir = storage.join(self.directory, pending[0])
        record = {"created": time.time(), "files": checksums(step_dir)}
        storage.write_text(storage.join(step_dir, CHECKSUMS), json.dumps(record))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``state`` onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored.state, restored.data

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        self.check_compatible(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored.state

    def restore_params(self, step: int, abstract_state: Any, part: str = "params") -> Any:
        """Only ``part`` of checkpoint ``step`` (``params``, or ``teacher``; an Orbax partial restore: the
        optimizer moments, a multiple of the parameters' size, are never read), with ``abstract_state``'s
        shardings."""
        item = {part: abstract_state[part]}
        self.check_compatible(step, item, part=part)
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        return ocp.PyTreeCheckpointer().restore(storage.join(self.directory, str(step), "state"), args=args)[part]

    def check_compatible(self, step: int, abstract_state: Any, describe: Callable[[], str] = lambda: "",
                         part: str | None = None) -> None:
        """Raises :class:`CheckpointError` when checkpoint ``step`` holds other shapes than ``abstract_state``
        (only its ``part`` of the state, e.g. 'params', when given)."""
        try:
            saved = ocp.StandardCheckpointer().metadata(storage.join(self.directory, str(step), "state")).item_metadata
            if part is not None:
                saved = {part: saved[part]}
        except Exception:  # unreadable metadata: the restore itself reports it (and falls back)
            return
        problem = shape_mismatch(saved, abstract_state)
        if problem:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this config: "
                                  f"{problem}{describe()}")

    def restore_newest(self, abstract_state: Any, describe: Callable[[], str] = lambda: ""
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, loader state) of the newest checkpoint that verifies and restores, or None.

        A damaged checkpoint is moved to ``checkpoints_corrupt/`` with a warning and the previous one is
        tried. One from another config is an error (``describe()`` adds what changed), never skipped.
        """
        for step in reversed(self.all_steps()):
            problem = verify(storage.join(self.directory, str(step))) if self.checksum else None
            if _agree(problem is None):
                self.check_compatible(step, abstract_state, describe)
                try:
                    state, data = self.restore(step, abstract_state)
                except Exception as err:  # truncated or unreadable files without checksums
                    problem = f"restore failed: {str(err).strip().splitlines()[0][:200]}"
            if _agree(problem is None):
                return step, state, data
            self._quarantine(step, problem or "damaged on another process")
        return None

    def _quarantine(self, step: int, problem: str) -> None:
        target = storage.join(self.workdir, "checkpoints_corrupt", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            storage.move(storage.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"maskjax_quarantine_{step}")
        storage.forget_listings(self.directory)
        self.manager.reload()
        older = [s for s in self.manager.all_steps() if s < step]
        fallback = f"falling back to step {max(older)}" if older else "no older checkpoint: starting from scratch"
        warn(f"checkpoint step {step} in {self.directory} is damaged ({problem}); moved it to {target}; {fallback}")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._write_error(self._saving, err) from err

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
