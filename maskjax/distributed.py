"""Multi-process runs through JAX's own multi-controller runtime (``jax.distributed``).

One process per host (TPU VM worker) or per GPU/node runs the same ``maskjax`` command. Each joins
the run with :func:`initialize` before any other JAX call: explicitly (``--coordinator``,
``--num_processes``, ``--process_id``, or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` environment), or through JAX's cluster detection on TPU VMs, SLURM and Open MPI.
Then :func:`check_same` makes every process prove it runs the same config and the same code.

When a process dies, JAX's coordination service notices the missing heartbeats and stops the other
processes after ``--heartbeat_timeout`` seconds, so a broken run ends instead of hanging.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from maskjax.errors import MaskjaxError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedError(MaskjaxError, RuntimeError):
    """A multi-process run that cannot start or whose processes disagree; the message says which."""


EXIT_PEER_LOST = 3


class PeerLost(DistributedError):
    """A step of a multi-process run failed in the runtime, almost always because another process
    stopped. The CLI exits with :data:`EXIT_PEER_LOST` right away: a normal exit would wait in JAX's
    shutdown barrier for the dead process and then abort."""

    exit_status = EXIT_PEER_LOST
    hard_exit = True

    def __init__(self, step: int, last_checkpoint: int | None, err: Exception):
        import jax

        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        resume = f"step {last_checkpoint}" if last_checkpoint else "the start (no checkpoint yet)"
        super().__init__(
            f"process {jax.process_index()} of {jax.process_count()}: step {step} failed in the runtime, most likely "
            f"because another process stopped (see its log): {first}; restart all processes to resume from {resume}")


@dataclasses.dataclass
class Options:
    """How this process joins a run: ``cluster`` is the detected scheduler (or 'explicit')."""

    cluster: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 100
    init_timeout: int = 300


def _int(name: str, value) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def detect_cluster(environ=None) -> str | None:
    """The multi-process scheduler this process runs under, from its environment; None on a
    workstation. Mirrors the environments JAX's own cluster detection understands."""
    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and (_int("SLURM_NTASKS", env["SLURM_NTASKS"]) or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int("OMPI_COMM_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE")) or 1) > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "gke_tpu"
    if env.get("TPU_SKIP_MDS_QUERY") is None and (os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")) \
            and environ is None:
        return "gce_tpu"  # a TPU VM: JAX asks the metadata server for the slice's workers
    return None


def options(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            mode: str = "auto", heartbeat_timeout: int = 100, init_timeout: int = 300,
            environ=None) -> Options | None:
    """Decides whether and how to call ``jax.distributed.initialize``; None = a single process.

    Flags win over the ``JAX_*`` environment; mode 'on' requires a multi-process run, 'off' never
    initialises."""
    env = os.environ if environ is None else environ
    if mode not in ("auto", "on", "off"):
        raise DistributedError(f"--distributed {mode!r} must be auto, on or off")
    if mode == "off":
        return None
    values = {
        "coordinator": coordinator or env.get(ENV["coordinator"]) or None,
        "num_processes": num_processes if num_processes is not None else _int(ENV["num_processes"], env.get(ENV["num_processes"])),
        "process_id": process_id if process_id is not None else _int(ENV["process_id"], env.get(ENV["process_id"])),
    }
    for flag, seconds in (("heartbeat_timeout", heartbeat_timeout), ("init_timeout", init_timeout)):
        if seconds < 1:
            raise DistributedError(f"--{flag} {seconds} must be >= 1 second")
    cluster = detect_cluster(environ)
    given = [k for k, v in values.items() if v is not None]
    if given and cluster is None:
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise DistributedError(f"--{missing[0]} is needed with --{given[0]} (or set {ENV[missing[0]]})")
        cluster = "explicit"
    if values["num_processes"] is not None and values["num_processes"] < 1:
        raise DistributedError(f"--num_processes {values['num_processes']} must be >= 1")
    if values["process_id"] is not None and values["num_processes"] is not None \
            and not 0 <= values["process_id"] < values["num_processes"]:
        raise DistributedError(f"--process_id {values['process_id']} must be in [0, {values['num_processes']})")
    if cluster is None:
        if mode == "on":
            raise DistributedError("--distributed on, but no --coordinator/--num_processes/--process_id were given "
                                   "and no TPU pod, SLURM or Open MPI job was detected")
        return None
    return Options(cluster=cluster, heartbeat_timeout=heartbeat_timeout, init_timeout=init_timeout, **values)


def initialize(opts: Options | None) -> None:
    """Joins the run (before anything else touches a JAX backend); a no-op for a single process."""
    if opts is None:
        return
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=opts.coordinator, num_processes=opts.num_processes, process_id=opts.process_id,
            initialization_timeout=opts.init_timeout, heartbeat_timeout_seconds=opts.heartbeat_timeout,
        )
    except Exception as err:  # noqa: BLE001 - XLA raises plain RuntimeErrors / XlaRuntimeErrors
        where = opts.coordinator or f"the {opts.cluster} coordinator"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(f"could not join the run at {where} as process {opts.process_id} of "
                               f"{opts.num_processes} ({opts.cluster}): {first}") from None


# --------------------------------------------------------------------------- agreement between processes


def code_version() -> str:
    """Hash of maskjax's own sources and the versions of the libraries that shape a step."""
    import importlib.metadata

    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=none".encode())
    return digest.hexdigest()


def _flat(tree: Any, prefix: str = "config") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: tree}


def first_difference(mine: dict, theirs: dict) -> str:
    """'config.KEY: A vs B' for the first key (sorted) where two config dicts differ."""
    a, b = _flat(mine), _flat(theirs)
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            return f"{key}: {a.get(key, '<missing>')!r} here vs {b.get(key, '<missing>')!r} on process 0"
    return "no field differs (the values differ in type)"


def check_same(config) -> None:
    """Every process must run the same config and code; otherwise each one stops with an error that
    names the processes that differ (and, on those, the first differing config key). All processes
    take the same collective steps whatever the outcome, so nobody is left waiting."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).digest() + bytes.fromhex(code_version())
    digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8)))
    bad_config = [p for p in range(len(digests)) if not np.array_equal(digests[p, :32], digests[0, :32])]
    bad_code = [p for p in range(len(digests)) if not np.array_equal(digests[p, 32:], digests[0, 32:])]
    if not bad_config and not bad_code:
        return
    me = jax.process_index()
    detail = ""
    if bad_config:  # everyone takes part in sending process 0's config to the others
        raw = np.frombuffer(text.encode(), np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(raw), np.int32)))
        padded = np.zeros(size, np.uint8)
        padded[: min(size, len(raw))] = raw[:size]
        zero = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode()
        if me in bad_config:
            detail = f" ({first_difference(json.loads(text), json.loads(zero))})"
    if bad_config:
        raise DistributedError(f"processes {bad_config} run a different config from process 0{detail}; "
                               "start every process with the same --config and overrides")
    raise DistributedError(f"processes {bad_code} run different maskjax code or library versions from process 0 "
                           f"(code version {code_version()[:12]} on process {me}); install the same version everywhere")
