#!/usr/bin/env python3
"""Runs one command as N cooperating JAX processes on this machine, each with M virtual CPU devices.

    python launch/local_multiprocess.py --processes 2 --devices 4 -- \\
        maskjax train --config configs/mae_digits.py --workdir runs/mp

Development and tests only: it is how a pod or cluster run looks from JAX's side (one
``jax.distributed`` run of N processes, gloo collectives on CPU), without a pod. Each process gets
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (which ``maskjax`` reads), CPU
devices through ``XLA_FLAGS``, and its output in ``--log_dir/process_<i>.log``; process 0's output is
also shown here, the others' lines prefixed with ``[i]``.

The launcher never stops a process because another one failed: that is the job of JAX's
coordination service (``maskjax --heartbeat_timeout``), exactly as on a cluster. Only when every
process has not ended ``--grace`` seconds after the first failure does it kill the rest.
Exit status: 0 when all processes succeed, else the status of the first process that failed
(128 + signal number for a signal).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, index: int, processes: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",
    )
    return env


def _pump(stream, log, index: int) -> None:
    """Copies a child's output to its log file and to this terminal (prefixed unless process 0)."""
    at_line_start = True
    out = sys.stdout.buffer
    prefix = f"[{index}] ".encode()
    while chunk := os.read(stream.fileno(), 65536):
        log.write(chunk)
        log.flush()
        if index == 0:
            out.write(chunk)
        else:
            for piece in re.split(rb"(?<=[\n\r])", chunk):
                if piece:
                    out.write((prefix if at_line_start else b"") + piece)
                    at_line_start = piece.endswith((b"\n", b"\r"))
        out.flush()


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def status(code: int) -> int:
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: local_multiprocess.py [--processes N] [--devices M] [--log_dir DIR] -- COMMAND ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="local_multiprocess.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--log_dir", default="", help="where process_<i>.log go (default: logs/multiprocess)")
    parser.add_argument("--grace", type=float, default=300.0,
                        help="seconds after the first failure before the remaining processes are killed")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        print("local_multiprocess.py: no command after --", file=sys.stderr)
        return 2
    if args.processes < 1 or args.devices < 1:
        print("local_multiprocess.py: --processes and --devices must be >= 1", file=sys.stderr)
        return 2
    port = args.port or free_port()
    log_dir = args.log_dir or os.path.join("logs", "multiprocess")
    os.makedirs(log_dir, exist_ok=True)

    children, pumps, logs = [], [], []
    for i in range(args.processes):
        log = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
        child = subprocess.Popen(command, env=process_env(os.environ, i, args.processes, args.devices, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(child.stdout, log, i), daemon=True)
        pump.start()
        children.append(child)
        pumps.append(pump)
        logs.append(log)
    print(f"local_multiprocess: {args.processes} processes x {args.devices} CPU devices, coordinator "
          f"localhost:{port}, pids {[c.pid for c in children]}, logs in {log_dir}", file=sys.stderr, flush=True)

    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    first_failure: tuple[int, int] | None = None
    failed_at = None
    reported: set[int] = set()
    while True:
        codes = [c.poll() for c in children]
        for i, code in enumerate(codes):
            if code is not None and i not in reported:
                reported.add(i)
                if code != 0:
                    print(f"local_multiprocess: process {i} {describe(code)}", file=sys.stderr, flush=True)
                    if first_failure is None:
                        first_failure, failed_at = (i, code), time.monotonic()
        if all(code is not None for code in codes):
            break
        if failed_at is not None and time.monotonic() - failed_at > args.grace:
            for i, c in enumerate(children):
                if c.poll() is None:
                    print(f"local_multiprocess: process {i} still running {args.grace:.0f}s after process "
                          f"{first_failure[0]} failed; killing it", file=sys.stderr, flush=True)
                    os.killpg(c.pid, signal.SIGKILL)
        time.sleep(0.2)
    for pump, log in zip(pumps, logs):
        pump.join(timeout=5)
        log.close()
    return 0 if first_failure is None else status(first_failure[1])


if __name__ == "__main__":
    sys.exit(main())
