"""Ahead-of-time checks: lower and compile the real train step for a config and mesh without running
it, and read memory and FLOPs from the compiled executable (``maskjax compile-check``).

Nothing is allocated: the state and batch are ``ShapeDtypeStruct`` s carrying their shardings, so a
ViT-L at batch 4096 compiles on a laptop. The numbers are per device, from XLA's own buffer
assignment for the backend that compiled it; on CPU (``--devices N`` virtual devices) they are a
guide to TPU/GPU memory, not a measurement of it (layouts and fusion differ).
"""
from __future__ import annotations

import re
import time
from typing import Any

import jax
import numpy as np

GiB = 1024 ** 3

# HBM per device of accelerators whose runtime does not report a limit (``memory_stats`` is empty).
KNOWN_MEMORY = {
    "TPU v2": 8 * GiB, "TPU v3": 16 * GiB, "TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB, "TPU v6e": 32 * GiB,
    "NVIDIA H100": 80 * GiB, "NVIDIA H200": 141 * GiB, "NVIDIA A100-SXM4-40GB": 40 * GiB,
    "NVIDIA A100-SXM4-80GB": 80 * GiB, "NVIDIA A100": 40 * GiB,
}


EXIT_DOES_NOT_FIT = 4  # ``maskjax compile-check`` status when the step needs more memory than a device has


def parse_bytes(text: str) -> int:
    """'16GiB', '16G', '512MiB', '1.5e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 16GiB, 80G, 512MiB)")
    unit = (match.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(unit or " "))


def by_device_kind(table: dict, device_kind: str) -> tuple[str, Any] | None:
    """(kind, value) of the longest key of ``table`` that ``device_kind`` starts with, or None."""
    for kind in sorted(table, key=len, reverse=True):
        if device_kind.startswith(kind):
            return kind, table[kind]
    return None


def memory_stats(device: jax.Device) -> dict:
    """The allocator statistics of ``device``; empty where the backend keeps none (CPU)."""
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise
        return {}


def device_memory(device: jax.Device) -> tuple[int | None, str]:
    """(bytes per device, where the number comes from)."""
    stats = memory_stats(device)
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} runtime limit"
    known = by_device_kind(KNOWN_MEMORY, device.device_kind)
    if known is not None:
        return known[1], f"{known[0]} HBM"
    if device.platform == "cpu":
        import os

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None, "unknown"
        return total // max(1, len(jax.local_devices())), f"host RAM / {len(jax.local_devices())} CPU devices"
    return None, "unknown"


def compile_step(setup) -> tuple[Any, float, float]:
    """(compiled train step, seconds to lower, seconds to compile)."""
    started = time.perf_counter()
    lowered = setup.step_fn.lower(setup.abstract_state, setup.abstract_batch())
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - started, time.perf_counter() - lowered_at


def memory(compiled) -> dict:
    """Per-device bytes from XLA's buffer assignment; ``peak`` = arguments + outputs - donated
    (aliased) buffers + temporaries, i.e. what must be resident while the step runs."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    out = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def compiled_flops(compiled) -> float | None:
    """FLOPs per device per step as XLA counts them (None when the backend does not say)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def check(setup, capacity: int | None = None) -> dict:
    """Compiles ``setup``'s train step and reports memory, FLOPs and whether it fits ``capacity``
    bytes per device (default: what the device reports or :data:`KNOWN_MEMORY`)."""
    compiled, lower_s, compile_s = compile_step(setup)
    device = setup.mesh.devices.flat[0]
    source = "--device_memory"
    if capacity is None:
        capacity, source = device_memory(device)
    mem = memory(compiled)
    report = {
        "devices": int(setup.mesh.size), "mesh": dict(setup.mesh.shape), "device_kind": device.device_kind,
        "platform": device.platform, "batch_size": int(setup.config.batch_size),
        "lower_seconds": lower_s, "compile_seconds": compile_s,
        "memory_per_device": mem, "capacity_per_device": capacity, "capacity_source": source,
        "flops_per_device": compiled_flops(compiled),
        "model_flops_per_step": float(setup.objective.flops()) if hasattr(setup.objective, "flops") else None,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))),
    }
    report["fits"] = None if capacity is None or not mem else mem["peak"] <= capacity
    return report


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def format_report(r: dict) -> str:
    mem = r["memory_per_device"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"compiled train step: {r['parameters'] / 1e6:.1f}M parameters, batch {r['batch_size']}, "
        f"{r['devices']} x {r['device_kind']} ({mesh}); lowered in {r['lower_seconds']:.1f}s, "
        f"compiled in {r['compile_seconds']:.1f}s",
    ]
    if mem:
        lines.append(
            f"memory per device: arguments {_size(mem['argument'])}, outputs {_size(mem['output'])}, "
            f"donated {_size(mem['alias'])}, temporaries {_size(mem['temp'])}, code {_size(mem['generated_code'])}"
            f" -> peak {_size(mem['peak'])}")
    else:
        lines.append("memory per device: not reported by this backend")
    if r["flops_per_device"] is not None:
        lines.append(f"FLOPs per device per step (XLA): {r['flops_per_device'] / 1e12:.3f} TFLOP")
    if r["model_flops_per_step"] is not None:
        lines.append(f"model FLOPs per step (analytic, all devices): {r['model_flops_per_step'] / 1e12:.3f} TFLOP")
    if r["fits"] is None:
        lines.append(f"fits: unknown (device memory {_size(r['capacity_per_device'])}; pass --device_memory)")
    else:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"{verdict}: needs {_size(mem['peak'])} of {_size(r['capacity_per_device'])} per device "
                     f"({r['capacity_source']}, {100 * mem['peak'] / r['capacity_per_device']:.0f}%)")
    return "\n".join(lines)
