"""``maskjax params``: every parameter of a config's model with its shape, logical axes, sharding on
the run's mesh, role, weight decay and trainability, then totals and the bytes of parameters plus
optimizer state per device. Abstract shapes only: nothing is compiled or allocated, so a pod-sized
recipe can be checked on a laptop (with ``--devices`` virtual devices) before booking hardware.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from maskjax import step as step_lib


GiB = 1024**3


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def _spec(sharding, ndim: int) -> str:
    """The mesh axes each array axis is split over, ``-`` where it is replicated."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(tuple(sharding.spec)))
    entries = ["+".join(e) if isinstance(e, tuple) else (e or "-") for e in spec]
    return "(" + ", ".join(entry or "-" for entry in entries) + ")"


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def table(setup: step_lib.Setup) -> dict:
    """Rows (one per parameter, in tree order) and totals of ``setup``'s model."""
    pick = lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))
    rows = []

    def add(part: str, axes, roles, decays, trainable: bool, prefix: str = ""):
        flat = jax.tree_util.tree_flatten_with_path(setup.abstract_state[part])[0]
        for (keys, leaf), names, role, sharding, decayed in zip(
                flat, pick(axes), jax.tree.leaves(roles), jax.tree.leaves(setup.state_shardings[part]),
                jax.tree.leaves(decays)):
            rows.append({
                "path": prefix + _path(keys), "shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype)),
                "axes": list(names), "sharding": _spec(sharding, len(leaf.shape)),
                "role": role, "weight_decay": bool(decayed) and setup.config.optim.weight_decay > 0,
                "trainable": trainable and role != "statistic", "size": int(math.prod(leaf.shape)),
            })

    add("params", setup.param_axes, setup.param_roles,
        step_lib.decay_mask(setup.param_roles, setup.config.optim.decay_roles), True)
    if setup.teacher is not None:  # in the train state, never seen by the optimizer
        add("teacher", setup.teacher_axes, setup.teacher_roles,
            jax.tree.map(lambda _: False, setup.teacher_roles), False, "teacher/")
    abstract = setup.abstract_state["params"]
    state_shardings = setup.state_shardings
    totals = {
        "parameters": sum(r["size"] for r in rows),
        "trainable": sum(r["size"] for r in rows if r["trainable"]),
        "decayed": sum(r["size"] for r in rows if r["weight_decay"]),
        "parameter_bytes_per_device": _bytes_per_device(abstract, state_shardings["params"]),
        "optimizer_bytes_per_device": _bytes_per_device(setup.abstract_state["opt_state"],
                                                        state_shardings["opt_state"]),
        "teacher_bytes_per_device": (_bytes_per_device(setup.abstract_state["teacher"], state_shardings["teacher"])
                                     if setup.teacher is not None else 0),
        "devices": int(setup.mesh.size), "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "weight_decay": float(setup.config.optim.weight_decay),
        "decay_roles": list(setup.config.optim.decay_roles),
    }
    return {"rows": rows, "totals": totals}


def _size(n: int) -> str:
    return f"{n / GiB:.3f} GiB" if n >= GiB // 10 else f"{n / 2**20:.2f} MiB"


def format_table(result: dict) -> str:
    rows, t = result["rows"], result["totals"]
    header = ("path", "shape", "dtype", "axes", "sharding", "role", "decay", "train")
    cells = [header] + [(
        r["path"], "x".join(map(str, r["shape"])) or "scalar", r["dtype"],
        "(" + ", ".join(n or "-" for n in r["axes"]) + ")", r["sharding"], r["role"],
        "yes" if r["weight_decay"] else "no", "yes" if r["trainable"] else "no") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mesh = " x ".join(f"{k}={v}" for k, v in t["mesh"].items())
    together = t["parameter_bytes_per_device"] + t["optimizer_bytes_per_device"] + t.get("teacher_bytes_per_device", 0)
    lines += [
        "",
        f"parameters {t['parameters']:,} (trainable {t['trainable']:,}; weight decay {t['weight_decay']:g} on "
        f"{t['decayed']:,}: roles {', '.join(t['decay_roles'])})",
        f"per device on {t['devices']} devices ({mesh}): parameters {_size(t['parameter_bytes_per_device'])}, "
        f"optimizer state {_size(t['optimizer_bytes_per_device'])}"
        + (f", teacher {_size(t['teacher_bytes_per_device'])}" if t.get("teacher_bytes_per_device") else "")
        + f", together {_size(together)}",
    ]
    return "\n".join(lines)
