"""``maskjax bench``: the real train step (the trainer's own ``Setup``), timed step by step.

Per run: compile time (lower + compile, apart from the steps), median and min step time, examples/s
and tokens/s, time waiting for input, peak device memory where the backend reports it, analytic
model FLOPs per step (``objective.flops()``, written once per objective and tested against XLA's
cost analysis), achieved TFLOP/s per device and MFU against the device's peak. On CPU the peak is
measured in the same run with a large float32 matmul on every device at once.

Each step is timed from asking for the batch to the new state being ready, so the input pipeline's
share is in the number (and reported separately as ``data_wait``).

``--profile DIR``: one more step after the timed ones runs under ``jax.profiler``; its trace (TensorBoard's
profile plugin, or the ``.trace.json.gz`` in Perfetto) lands in DIR and the device time of that step is
summed per operation (the JAX primitive each compiled XLA op came from) for the terminal and the JSON.
"""
from __future__ import annotations

import collections
import glob
import gzip
import itertools
import json
import math
import os
import re
import statistics
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from maskjax import step as step_lib
from maskjax.errors import MaskjaxError
from maskjax import aot, config as config_lib, distributed
from maskjax import data as data_lib
from maskjax.models import layers

# Dense peak FLOP/s per JAX device: (bfloat16, float32). TPU v2/v3 devices are single cores; v4 and
# later are chips. GPU float32 is the TF32 tensor-core rate that JAX's default matmul precision uses.
PEAK_FLOPS = {
    "TPU v2": (22.5e12, None), "TPU v3": (61.5e12, None), "TPU v4": (275e12, None),
    "TPU v5 lite": (197e12, None), "TPU v5e": (197e12, None), "TPU v5p": (459e12, None), "TPU v5": (459e12, None),
    "TPU v6 lite": (918e12, None), "TPU v6e": (918e12, None),
    "NVIDIA H100 PCIe": (756e12, 378e12), "NVIDIA H100": (989e12, 494e12), "NVIDIA H200": (989e12, 494e12),
    "NVIDIA A100": (312e12, 156e12), "NVIDIA L4": (121e12, 60e12),
}

# Short names accepted by --sweep.
SWEEP_ALIASES = {"mask_ratio": "mask.ratio", "batch": "batch_size", "depth": "model.depth", "width": "model.width"}


class BenchError(MaskjaxError, ValueError):
    """A bad benchmark flag; the message names it."""


def table_peak(device: jax.Device, dtype: str) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``: float16 and bfloat16 run at the same
    tensor-core rate, float32 at the (TF32 on GPUs) float32 rate; None where the table has no entry."""
    known = aot.by_device_kind(PEAK_FLOPS, device.device_kind)
    if known is None:
        return None
    half, fp32 = known[1]
    return half if dtype in ("bfloat16", "float16") else fp32


_BEST_PEAK: dict[tuple, float] = {}


def measured_peak(devices: tuple) -> float:
    """:func:`measure_matmul_peak` now, or a higher value measured earlier in this process on the same
    devices. A shared host's speed drifts by tens of percent over minutes; :func:`run` measures before
    and after the timed steps, and the best of all is the peak (so MFU errs low, never high)."""
    _BEST_PEAK[devices] = max(_BEST_PEAK.get(devices, 0.0), measure_matmul_peak(list(devices)))
    return _BEST_PEAK[devices]


def measure_matmul_peak(devices, size: int | None = None, repeats: int = 10) -> float:
    """Best float32 FLOP/s per device of one ``size``-square matmul on every device at once (2048 on
    one device, 1024 each on several; the best of ``repeats``, so a busy moment does not lower it)."""
    size = size or (2048 if len(devices) == 1 else 1024)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    n = len(devices)
    a = jax.device_put(jnp.ones((n, size, size), jnp.float32), spec)
    b = jax.device_put(jnp.ones((n, size, size), jnp.float32) * 0.5, spec)
    fn = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=spec)
    fn(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size ** 3 / best


def device_peak(setup) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from) for the run's compute dtype."""
    device = setup.mesh.devices.flat[0]
    dtype = setup.config.model.dtype
    peak = table_peak(device, dtype)
    if peak is not None:
        return peak, f"{device.device_kind} {dtype} spec"
    if device.platform == "cpu":
        return measured_peak(tuple(setup.mesh.devices.flat)), "measured float32 matmul on these devices"
    return None, "unknown"


def synthetic_batches(setup, seed: int = 0) -> Iterator[dict]:
    """Endless local batches of the objective's own synthetic data (``objective.synthetic_batch``)."""
    rows = setup.rows(setup.config.batch_size)
    pool = [setup.objective.synthetic_batch(np.random.default_rng([seed, i])) for i in range(2)]
    pool = [{k: v[rows] for k, v in batch.items()} for batch in pool]
    return itertools.cycle(pool)


def attention_kernel(config) -> str:
    """The attention implementation (:data:`layers.ATTENTION` less 'auto') the encoder's blocks run with (on
    this backend)."""
    m = config.model
    return layers.attention_implementation(m.attention, layers.compute_dtype(m.dtype),
                                           m.width // m.heads)


def peak_memory(setup) -> int | None:
    """Largest ``peak_bytes_in_use`` over this process's devices (None where the backend keeps none)."""
    values = []
    for device in setup.mesh.devices.flat:
        if device.process_index != jax.process_index():
            continue
        stats = aot.memory_stats(device)
        if "peak_bytes_in_use" in stats:
            values.append(int(stats["peak_bytes_in_use"]))
    return max(values) if values else None


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)$', re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = {"closed_call", "core_call", "pjit", "jit", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call",
          "while", "body", "cond", "branch", "scan"}
_CONTAINER = re.compile(r"\s(?:while|conditional|call)\(")


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Compiled HLO instruction name -> what it computes: the JAX primitive in its metadata
    (``.../bld,dnh->blnh/dot_general`` -> ``dot_general``), else its name without the ``.N`` suffix.
    Loops, conditionals and calls are left out (their ops are counted themselves)."""
    kinds = {}
    for name, rest in _INSTRUCTION.findall(hlo_text):
        if _CONTAINER.search(rest):  # its time is its body's ops' time, counted there
            continue
        op_name = _OP_NAME.search(rest)
        primitive = op_name.group(1).rsplit("/", 1)[-1] if op_name else ""
        if not primitive or primitive in _CALLS or primitive.startswith(("jit(", "pjit(")):
            primitive = re.sub(r"^wrapped_|\.\d+$", "", name)  # a call's own ops: name them by what they are
        kinds[name] = primitive
    return kinds


def op_breakdown(trace_dir: str, hlo_text: str, top: int = 8) -> list[dict]:
    """Time per operation kind (:func:`op_kinds`) in the newest Perfetto trace under ``trace_dir``: the
    ``top`` largest as {op, seconds, share}, share of all XLA-op time in the trace (ops that run
    concurrently on several threads are each counted in full)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        return []
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    kinds, totals = op_kinds(hlo_text), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in kinds:
            totals[kinds[event["name"]]] += event.get("dur", 0)
    whole = sum(totals.values())
    return [{"op": op, "seconds": us / 1e6, "share": us / whole} for op, us in totals.most_common(top)]


def profile_step(compiled, state, batch, trace_dir: str):
    """One step under ``jax.profiler`` into ``trace_dir``; returns (state, :func:`op_breakdown`)."""
    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    return state, op_breakdown(trace_dir, compiled.as_text())


def run(config, steps: int, warmup: int, data: str = "real", progress: bool = True,
        profile: str | None = None) -> dict:
    """Benchmarks ``config``'s train step; returns one result row (all times in seconds). ``profile``: a
    directory for the trace of one extra step (:func:`profile_step`)."""
    if steps < 1:
        raise BenchError(f"--steps {steps} must be >= 1")
    if warmup < 0:
        raise BenchError(f"--warmup {warmup} must be >= 0")
    if data not in ("real", "synthetic"):
        raise BenchError(f"--data {data!r} must be real or synthetic")
    distributed.check_same(config)
    setup = step_lib.build(config)
    state = setup.init_fn()
    compiled, lower_s, compile_s = aot.compile_step(setup)
    if data == "real":
        loader = data_lib.train_loader(config, setup.rows(config.batch_size), kind=setup.objective.data_kind)
    else:
        loader = synthetic_batches(setup, config.seed)
    device_peak(setup)  # measured on CPU (the best of before and after the timed steps counts)
    step_times, waits = [], []
    try:
        for i in range(warmup + steps):
            started = time.perf_counter()
            local = next(loader)
            got = time.perf_counter()
            state, metrics = compiled(state, setup.global_batch(local))
            jax.block_until_ready(state)
            ended = time.perf_counter()
            if i >= warmup:
                step_times.append(ended - started)
                waits.append(got - started)
            if progress:
                print(f"\rbench step {i + 1}/{warmup + steps} ({'warm-up' if i < warmup else 'timed'}) "
                      f"{1000 * (ended - started):.0f} ms", end="", flush=True)
        loss = float(metrics["loss"])
        if profile:
            if jax.process_count() > 1:
                profile = os.path.join(profile, f"process-{jax.process_index()}")
            state, ops = profile_step(compiled, state, setup.global_batch(next(loader)), profile)
    finally:
        if hasattr(loader, "close"):
            loader.close()
        if progress:
            print("\r" + " " * 60 + "\r", end="", flush=True)
    median, best = statistics.median(step_times), min(step_times)
    devices = int(setup.mesh.size)
    flops = float(setup.objective.flops())
    peak_flops, peak_source = device_peak(setup)
    achieved = flops / median / devices
    batch = config.batch_size
    return {
        "objective": config.objective, "batch_size": batch, "mask_ratio": setup.objective.mask_ratio,
        "devices": devices, "device_kind": setup.mesh.devices.flat[0].device_kind, "mesh": dict(setup.mesh.shape),
        "dtype": config.model.dtype, "attention": attention_kernel(config), "data": data, "steps": steps,
        "warmup": warmup,
        "compile_seconds": lower_s + compile_s, "lower_seconds": lower_s,
        "step_seconds_median": median, "step_seconds_min": best,
        "examples_per_second": batch / median, "examples_per_second_per_device": batch / median / devices,
        "tokens_per_second": batch * setup.objective.tokens_per_example / median,
        "tokens_per_second_per_device": batch * setup.objective.tokens_per_example / median / devices,
        "data_wait_seconds_median": statistics.median(waits), "data_wait_fraction": sum(waits) / sum(step_times),
        "peak_memory_bytes": peak_memory(setup),
        "model_flops_per_step": flops, "achieved_tflops_per_device": achieved / 1e12,
        "peak_tflops_per_device": None if peak_flops is None else peak_flops / 1e12, "peak_source": peak_source,
        "mfu": None if peak_flops is None else achieved / peak_flops,
        "final_loss": loss,
        "profile": None if not profile else {"dir": profile, "ops": ops},
    }


def parse_sweeps(items: list[str]) -> list[tuple[str, list[str]]]:
    """``['mask_ratio=0,0.75', 'batch=64,128']`` -> [('mask.ratio', ['0', '0.75']), ('batch_size', [...])]."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        key = SWEEP_ALIASES.get(key.strip(), key.strip())
        values_list = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not values_list:
            raise BenchError(f"--sweep {item!r}: expected KEY=V1,V2,... (KEY a config key or one of "
                             f"{sorted(SWEEP_ALIASES)})")
        out.append((key, values_list))
    return out


def sweep(config_fn, sweeps: list[tuple[str, list[str]]], steps: int, warmup: int, data: str,
          progress: bool = True, profile: str | None = None) -> list[dict]:
    """One row per point of the grid of ``sweeps``; ``config_fn()`` gives a fresh config each time.
    ``profile``: a directory; each point's trace goes to a folder named after its values."""
    keys = [k for k, _ in sweeps]
    rows: list[dict] = []
    for values in itertools.product(*[v for _, v in sweeps]) if sweeps else [()]:
        config = config_lib.override(config_fn(), [f"{k}={v}" for k, v in zip(keys, values)])
        point_dir = profile
        if profile and keys:
            point_dir = os.path.join(profile, re.sub(r"[^\w.=,-]", "_", ",".join(f"{k}={v}" for k, v in zip(keys, values))))
        row = run(config, steps, warmup, data, progress=progress and jax.process_index() == 0, profile=point_dir)
        row["point"] = dict(zip(keys, values))
        rows.append(row)
        if progress and jax.process_index() == 0:
            if len(rows) == 1:
                print(header(keys), flush=True)
            print(format_row(row, keys), flush=True)
    return rows


COLUMNS = [  # (header, key, format)
    ("compile s", "compile_seconds", "{:.1f}"), ("median ms", "step_seconds_median", "{:.0f}"),
    ("min ms", "step_seconds_min", "{:.0f}"), ("ex/s", "examples_per_second", "{:.1f}"),
    ("tok/s/dev", "tokens_per_second_per_device", "{:.0f}"), ("data %", "data_wait_fraction", "{:.1f}"),
    ("GFLOP/step", "model_flops_per_step", "{:.1f}"), ("TFLOP/s/dev", "achieved_tflops_per_device", "{:.3f}"),
    ("MFU %", "mfu", "{:.1f}"), ("peak mem GiB", "peak_memory_bytes", "{:.2f}"),
]
SCALE = {"step_seconds_median": 1e3, "step_seconds_min": 1e3, "data_wait_fraction": 100.0,
         "model_flops_per_step": 1e-9, "mfu": 100.0, "peak_memory_bytes": 1 / 2 ** 30}


def header(keys: list[str]) -> str:
    return " | ".join([f"{k:>12}" for k in keys] + [f"{h:>12}" for h, _, _ in COLUMNS])


def format_row(row: dict, keys: list[str]) -> str:
    cells = [f"{row['point'].get(k, ''):>12}" for k in keys]
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        cells.append(f"{'-':>12}" if value is None else f"{fmt.format(value * SCALE.get(key, 1.0)):>12}")
    return " | ".join(cells)


def report(rows: list[dict], keys: list[str]) -> str:
    first = rows[0]
    lines = [f"{first['objective']} on {first['devices']} x {first['device_kind']} ({first['dtype']}, {first['attention']} attention, {first['data']} "
             f"data, {first['steps']} timed steps after {first['warmup']} warm-up); peak "
             f"{first['peak_tflops_per_device'] or 0:.3f} TFLOP/s per device ({first['peak_source']})",
             header(keys)]
    lines += [format_row(row, keys) for row in rows]
    for row in rows:
        if row.get("profile"):
            point = ", ".join(f"{k}={v}" for k, v in row.get("point", {}).items())
            ops = " | ".join(f"{op['op']} {100 * op['share']:.0f}%" for op in row["profile"]["ops"])
            lines.append(f"profile{' ' + point if point else ''}: {ops or 'no XLA op events in the trace'}")
            lines.append(f"  trace in {row['profile']['dir']} (tensorboard --logdir, or the .trace.json.gz in Perfetto)")
    return "\n".join(lines)


def cpu_model() -> str:
    """The host CPU's model name as ``lscpu`` prints it (from /proc/cpuinfo; '' where there is none):
    speed ratios against PyTorch differ between CPU kinds, so every result says which it ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def environment() -> dict[str, Any]:
    import platform

    return {"jax": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
            "process_count": jax.process_count(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
