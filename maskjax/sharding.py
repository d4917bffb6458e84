"""Meshes, logical-axis rules and shardings: the one place where logical names meet mesh axes.

Parameters and activations carry logical axis names (``embed``, ``mlp``, ``heads``, ...). The rules
table below maps each name to mesh axes (``data``, ``fsdp``, ``tensor``). Changing the parallelism
of a run is changing mesh sizes in the config; no model code changes.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from maskjax.errors import MaskjaxError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Parameter names first, then
# activation names (prefixed ``act_``) which must not reuse ``fsdp`` for features: the batch already
# runs over it.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("length", None),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


class MeshError(MaskjaxError, ValueError):
    pass


def rules_with(overrides: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
    """:data:`RULES` with ``overrides`` (``config.sharding_rules``: (logical name, mesh axis | tuple of
    axes | None) pairs) replacing their entries, e.g. ``(("embed", None),)`` replicates parameters and
    their optimizer state over fsdp (plain data parallelism on that axis), ``(("vocab", None),)`` keeps
    token tables whole, ``(("act_embed", "tensor"),)`` shards activations' features too. ``batch``
    stays data x fsdp: every input pipeline places its rows by it."""
    table = dict(RULES)
    for pair in overrides:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise MeshError(f"sharding_rules: {pair!r} is not a (logical name, mesh axes) pair")
        name, axes = pair
        if name not in table or name == "batch":
            raise MeshError(f"sharding_rules: {name!r} is not an overridable logical name; they are "
                            f"{sorted(k for k in table if k != 'batch')}")
        listed = (axes,) if isinstance(axes, str) else tuple(axes) if isinstance(axes, (tuple, list)) else ()
        if axes is not None and (not listed or any(a not in MESH_AXES for a in listed)):
            raise MeshError(f"sharding_rules: {name!r} -> {axes!r}: mesh axes are {MESH_AXES} (or None)")
        table[name] = axes if axes is None or isinstance(axes, str) else tuple(listed)
    return tuple(table.items())


class Names(tuple):
    """Logical axis names of one array. A tuple subclass is a pytree *leaf* for JAX, so trees of
    Names line up with trees of arrays (plain tuples and optax's NamedTuple states are nodes)."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves mesh sizes (one may be -1, "the rest") against the device count."""
    unknown = [k for k in sizes if k not in MESH_AXES]
    if unknown:
        raise MeshError(f"mesh.{unknown[0]} is not a mesh axis; axes are {MESH_AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({fixed})")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, have {num_devices}"
        )
    return tuple(shape)


def dcn_shape(shape: Sequence[int], dcn: Mapping[str, int] | None) -> tuple[int, ...]:
    """The part of each mesh axis that spans slices / nodes (DCN); 1 everywhere when ``dcn`` is empty.
    ``shape`` is the whole mesh; each ``dcn`` size must divide its axis."""
    dcn = dict(dcn or {})
    unknown = [k for k in dcn if k not in MESH_AXES]
    if unknown:
        raise MeshError(f"mesh_dcn.{unknown[0]} is not a mesh axis; axes are {MESH_AXES}")
    out = tuple(int(dcn.get(axis, 1)) for axis in MESH_AXES)
    for axis, size, whole in zip(MESH_AXES, out, shape):
        if size < 1 or whole % size:
            raise MeshError(f"mesh_dcn.{axis}={size} must be a positive divisor of mesh.{axis}={whole}")
    return out


def _granules(devices: Sequence[jax.Device], wanted: int) -> tuple[str, int]:
    """How devices group across the slow network: by ``slice_index`` (multi-slice TPU) when that
    gives ``wanted`` groups, else by process (multi-node GPU, CPU processes)."""
    counts = {attr: len({getattr(d, attr, None) for d in devices}) for attr in ("slice_index", "process_index")}
    for attr in ("slice_index", "process_index"):
        if counts[attr] == wanted:
            return attr, wanted
    return "process_index", counts["process_index"]


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
    """A Mesh over (data, fsdp, tensor) with Auto axis types (plain Flax layers reject Explicit).

    ``sizes`` are whole-mesh sizes; ``dcn`` (optional) says how much of each axis crosses the slow
    network between TPU slices or GPU nodes: the mesh is then built by
    ``mesh_utils.create_hybrid_device_mesh`` so that the rest of each axis stays inside a slice/node.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    outer = dcn_shape(shape, dcn)
    if math.prod(outer) > 1:
        attr, granules = _granules(devices, math.prod(outer))
        if math.prod(outer) != granules:
            raise MeshError(f"mesh_dcn {dict(zip(MESH_AXES, outer))} spans {math.prod(outer)} slices/nodes, but the "
                            f"devices form {granules} (slices, else processes)")
        from jax.experimental import mesh_utils

        inner = tuple(s // d for s, d in zip(shape, outer))
        grid = mesh_utils.create_hybrid_device_mesh(
            inner, outer, devices, process_is_granule=attr == "process_index")
        return Mesh(grid, MESH_AXES, axis_types=types)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def process_rows(mesh: Mesh, batch_size: int, process_index: int | None = None) -> np.ndarray:
    """The global batch rows whose shards live on this process's devices, ascending: what this
    process must load so that ``jax.make_array_from_process_local_data`` places each row where the
    mesh wants it (on TPU the device order follows the torus, so rows need not be one block)."""
    process_index = jax.process_index() if process_index is None else process_index
    spec = batch_sharding(mesh, 1)
    rows: set[int] = set()
    for device, index in spec.devices_indices_map((batch_size,)).items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array, and a dimension that the mesh axes do not divide
    stays replicated (e.g. a 10-way head on a 4-way tensor axis), so any model fits any mesh.
    """
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None:
            # Keep the longest prefix of axes whose product divides the dimension.
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_axes(state: nnx.State) -> Any:
    """Pure-dict tree of logical names (tuples) parallel to ``nnx.to_pure_dict(state)``."""

    def names(var):
        meta = var.get_metadata()
        return Names(meta.get("out_sharding") or meta.get("sharding") or (None,) * var.ndim)

    return nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(abstract: Any, axes: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
    """NamedShardings for a tree of abstract arrays given a parallel tree of logical names."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)),
        axes,
        abstract,
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------- activation constraints

_CONTEXT = threading.local()
_UNSET = object()


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = RULES):
    """Within this context, :func:`constrain` pins activations to ``mesh`` by logical names through
    ``rules``. ``None`` says so explicitly: no constraints (one device, or a test of the layers alone)."""
    previous = getattr(_CONTEXT, "value", _UNSET)
    _CONTEXT.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _CONTEXT.value = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under :func:`activation_mesh`. Outside any such
    context it raises: a model traced without it would compile unconstrained, which on a sharded
    mesh silently changes the layout XLA picks."""
    mesh, rules = _activation_context()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def _activation_context() -> tuple:
    current = getattr(_CONTEXT, "value", _UNSET)
    if current is _UNSET:
        raise MeshError("a model ran outside sharding.activation_mesh(mesh): wrap the call (Setup.jit_model_call "
                        "does), or pass None to run it unconstrained")
    return current


def per_shard(fn, args: Sequence[jax.Array], in_names: Sequence[Sequence[str | None]],
              out_names: Sequence[str | None]) -> jax.Array:
    """``fn(*args)`` run on each device's shard (``jax.shard_map``), the shards given by logical names
    under :func:`activation_mesh`, for kernels XLA cannot partition itself (a Pallas call would
    otherwise be gathered onto every device); its output is shaped like ``args[0]``. Without a mesh it
    is ``fn(*args)``."""
    mesh, rules = _activation_context()
    if mesh is None:
        return fn(*args)
    specs = tuple(logical_to_spec(n, a.shape, mesh, rules) for n, a in zip(in_names, args))
    out_spec = logical_to_spec(out_names, args[0].shape, mesh, rules)
    # check_vma=False: Pallas calls do not track which mesh axes their outputs vary over
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)
