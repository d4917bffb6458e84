"""The objective contract and registry (see the package docstring); objective modules import this,
never the package."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import jax
from flax import nnx

from maskjax.errors import ConfigError


class Objective(Protocol):
    name: ClassVar[str]
    config: Any

    def validate(self) -> None: ...
    def build(self, rngs: nnx.Rngs) -> nnx.Module: ...
    def loss(self, model: nnx.Module, batch: dict, key: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]: ...
    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]: ...
    def flops(self) -> int: ...


REGISTRY: dict[str, Callable[[Any], Objective]] = {}


def register(cls):
    """Class decorator: makes ``cls`` available as ``config.objective = cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def check_transformer(model_config, group: str = "model", config=None) -> None:
    """Config checks every transformer shares: heads divide width, known dtype and remat policy
    (where the group has them). ``group`` names the config group in errors. With ``config`` (the whole
    run's), ``model.attention='cudnn'`` is checked against this group's head dimension."""
    from maskjax.models import layers

    m = model_config
    for key in ("width", "depth", "heads"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 1:
            raise ConfigError(f"{group}.{key}", f"must be a positive int, got {m[key]!r}")
    if m.width % m.heads:
        raise ConfigError(f"{group}.heads", f"{m.heads} does not divide {group}.width={m.width}")
    if "dtype" in m and m.dtype not in layers.DTYPES:
        raise ConfigError(f"{group}.dtype", f"must be one of {tuple(layers.DTYPES)}, got {m.dtype!r}")
    if "remat" in m and m.remat not in layers.REMAT_POLICIES:
        raise ConfigError(f"{group}.remat", f"must be one of {tuple(layers.REMAT_POLICIES)}, got {m.remat!r}")
    if config is not None and config.model.get("attention", "auto") == "cudnn":
        dtype = layers.compute_dtype(config.model.dtype)
        why = layers.cudnn_unsupported(dtype)  # the platform and dtype
        if why is None:
            why = layers.cudnn_unsupported(dtype, m.width // m.heads)
            why = why and f"{why} in {group}.width / {group}.heads"
        if why:
            raise ConfigError("model.attention", f"'cudnn' {why}")


def get(config) -> Objective:
    if config.objective not in REGISTRY:
        raise ConfigError("objective", f"unknown objective {config.objective!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[config.objective](config)
