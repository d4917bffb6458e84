"""Objectives: each masked-pretraining method is one small class behind one protocol.

An objective is constructed from the run's config and provides

* ``build(rngs) -> nnx.Module``                         the model (parameters only, no mutable state);
* ``loss(model, batch, key, step) -> (scalar, dict)``   pure; each example's masks drawn from its own key
                                                        (``base.example_keys(key, batch)``);
* ``batch_spec() -> {name: (shape, dtype)}``            what the input pipeline must deliver (global batch);
* ``flops() -> int``                                    analytic model FLOPs of one training step;
* ``validate()``                                        raises ``ConfigError`` naming the bad key.

and optionally ``features(model, batch)`` (frozen features for probes),
``reconstruct(model, batch, key)`` (images for the eval PNG), ``eval_step(model, batch, key,
unigram)`` + ``summarize(totals)`` (held-out metrics summed over the eval split, next to a
context-free baseline), ``sample(model, key, num, steps)`` (generation), ``teacher()`` (a second
network in the train state) and ``after_update(params, stats, key, step)`` (parameters rewritten from
the loss's batch statistics, e.g. an EMA codebook); see ``base.Objective``. ``data_kind`` says which
input pipeline feeds it ('image', 'image_text' or 'text'). Look-up is by ``config.objective``.
"""
from __future__ import annotations

import importlib
import pkgutil

from maskjax.objectives.base import (  # noqa: F401
    REGISTRY, Objective, base_config, check_transformer, from_saved, get, register, saved_config)

# Every module of this package registers its objectives on import: a new objective is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
