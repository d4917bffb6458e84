"""Config files (big_vision style ``path.py:arg``), command-line overrides and validation.

Everything here runs before JAX compiles anything; every error is a :class:`ConfigError` whose
message starts with the offending key, so the CLI can print one line and exit 2.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
from typing import Callable, Iterable

import ml_collections


from maskjax.errors import ConfigError  # noqa: F401  (re-exported: configs raise config.ConfigError)


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults; config files start from this and change fields."""
    c = ml_collections.ConfigDict()
    c.objective = ""  # every config names one (maskjax.objectives.REGISTRY)
    # Start from published weights: a Hugging Face model directory or a maskjax .npz (maskjax export)
    c.init_from = ""
    c.seed = 0
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 0  # 0: evaluate at the end only
    c.data = dict(
        name="maskjax_digits", data_dir="", manual_dir="", image_size=16, channels=1, frames=0, frame_stride=1,
        train_split="train", eval_split="test", image_key="image", label_key="label",
        crop_scale=(0.2, 1.0), flip=True, mean=(0.5,), std=(0.5,), num_threads=2, prefetch=4,
        # text: tokenizer file ("" = the vocabulary stored beside an embedded corpus), packed length
        tokenizer="", seq_len=128, text_key="text",
    )
    c.model = dict(
        patch_size=4, tubelet=2, width=128, depth=4, heads=4, mlp_ratio=4.0, cls_token=True,
        dtype="float32", remat="none", one_hot_gather=False,
        # True: one lax.scan over the stacked layers (compile time flat in depth); False: the same layers
        # unrolled at trace time (same parameters and results; faster steps on CPU, longer compiles)
        scan_layers=True,
        # image/video encoders (and the MAE decoder): fixed positions, MAE's 'sincos' or VideoMAE's 'sincos_1d'
        pos_embed="sincos",
        # text encoder: position table size, 'learned' or 'rotary' positions, pre- or post-norm blocks
        max_len=512, positions="learned", pre_norm=True,
        # every transformer block (encoders, MAE decoder, FLIP text tower): biases on q/k/v, LayerNorm epsilon
        qkv_bias=False, norm_eps=1e-6,
        # attention kernel: 'auto' (cuDNN flash attention on a CUDA GPU in bf16/fp16, splash on a TPU, else XLA),
        # 'xla', 'cudnn', 'splash', 'splash_interpret' (the splash kernel in Pallas's interpreter: checks on CPU)
        attention="auto",
    )
    c.decoder = dict(width=64, depth=2, heads=4, embed_bias=True)
    c.mask = dict(kind="random", ratio=0.75, cell=2, min_patches=16, min_aspect=0.3,
                  # inverse block (data2vec 2.0): side of the visible squares, extra share of centres drawn
                  block_length=3, block_adjust=0.07,
                  filter="band", low=0.15, high=0.35,
                  # MLM: ratio schedule over training ('constant', 'linear', 'cosine') ending at final_ratio
                  schedule="constant", final_ratio=0.15,
                  # MAE / video MAE: VideoMAE V2 dual masking, share of tokens the decoder drops (0 = off)
                  decoder_ratio=0.0)
    # targets: 'pixels' or 'hog' (MaskFeat: hog_bins orientations per hog_cell x hog_cell pixels)
    # norm_pix_mode: 'patch' (MAE, MAE-ST: each patch vector) or 'channel' (VideoMAE: each channel of a tubelet)
    c.loss = dict(norm_pix=True, norm_pix_mode="patch", target="pixels", hog_cell=8, hog_bins=9)
    # Groups only one objective reads (flip, mlm, diffusion, hpm, ...) are declared by that objective
    # (Objective.config_groups) and added by maskjax.objectives.base_config(name).
    # decay_roles: which parameter roles (maskjax.models.layers.ROLES) weight decay applies to
    c.optim = dict(
        base_lr=1.5e-4, base_batch=256, b1=0.9, b2=0.95, eps=1e-8, bias_correction=True, weight_decay=0.05,
        warmup_steps=100, warmup_linspace=False,
        schedule="cosine", decay_start="warmup_end", min_lr_ratio=0.0, clip_norm=0.0, grad_accum=1,
        decay_roles=("kernel",),
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # multi-slice TPU / multi-node GPU: the part of each mesh axis that crosses slices or nodes (the
    # slow network); the rest of the axis stays inside one. Product = number of slices (or processes).
    c.mesh_dcn = dict(data=1, fsdp=1, tensor=1)
    # (logical name, mesh axes) pairs replacing entries of maskjax.sharding.RULES, e.g. (("embed", None),)
    c.sharding_rules = ()
    # checksum: record SHA-256 of every checkpoint file and verify before restoring (falls back past damage)
    c.checkpoint = dict(every=500, keep=3, async_save=True, checksum=True)
    # nonfinite: what a step with a non-finite loss, gradient or update does: 'stop' (save the last good
    # state, exit 5) or 'skip' (leave the state as it was, count it; stop after max_skipped_steps, 0 = never).
    # bad_records: a record that cannot be decoded: 'stop' (error naming it) or 'skip' (count it; its
    # batch slot repeats another example of the batch, every other record keeps its place).
    c.faults = dict(nonfinite="stop", max_skipped_steps=100, bad_records="stop")
    # zero_shot (FLIP): prompt templates ('{}' = class name) and class names ('' = the dataset's labels)
    # finetune_epochs > 0: also fine-tune the encoder end to end with a linear head (image encoders)
    # text_probe: text encoders on a downstream task (text_task: the embedded corpus's package-of-origin
    # task, or a prepared TFDS classification dataset by name with its text_fields and text_splits)
    c.eval = dict(probe=True, knn_k=20, num_images=8, batch_size=256, max_batches=0, text_probe=True, text_classes=8,
                  text_task="package", text_fields=("sentence",), text_splits=("train", "validation"),
                  finetune_epochs=0.0, finetune_lr=1e-3,
                  zero_shot=True, prompts=("a photo of a {}.",), class_names=())
    return c


# objective name -> the config groups it declares; set by maskjax.objectives when it is imported (this
# module must not import it), so that --config.objective=NAME brings NAME's groups with their defaults.
objective_groups: Callable[[str], dict] | None = None


def variants(arg: str, known) -> set[str]:
    """The comma-separated variants of ``--config file.py:a,b``; an unknown one is a ValueError."""
    chosen = set(arg.split(",")) if arg else set()
    unknown = sorted(chosen - set(known))
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(known)}")
    return chosen


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:arg]`` by calling its ``get_config(arg)``; returns a locked config."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError("file", f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"maskjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a broken config file is still one line of error
        raise ConfigError("file", f"{path!r} failed to load: {type(err).__name__}: {err}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError("file", f"{path!r} has no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as err:  # e.g. an unknown variant
        raise ConfigError("file", f"{spec!r}: {err}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError("file", f"{path!r}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


def from_saved(saved: dict, groups: dict | None = None) -> ml_collections.ConfigDict:
    """A run's saved ``config.json`` merged over :func:`base_config`'s defaults plus ``groups`` (its
    objective's, see ``maskjax.objectives.from_saved``), so a field added after the run was written
    reads as its default instead of being missing. Saved values win; groups the defaults lack are kept
    as saved."""

    def merge(defaults: dict, values: dict) -> dict:
        out = dict(defaults)
        for key, value in values.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return ml_collections.ConfigDict(merge({**base_config().to_dict(), **(groups or {})}, saved))


def _parse(key: str, text: str, current):
    """Parses an override value to the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(key, f"expected a bool, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(key, f"cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(current)(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(key, f"expected {type(current).__name__}, got {text!r}")
    return value


def override(config: ml_collections.ConfigDict, items: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``key.path=value`` overrides (a leading ``--config.`` or ``config.`` is dropped)."""
    for item in items:
        item = item.removeprefix("--").removeprefix("config.")
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(key, "override needs the form --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(".".join(parents[: i + 1]), "unknown key")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(key, "unknown key")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(key, "is a group; override one of its fields")
        value = _parse(key, text, node[leaf])
        with node.unlocked():
            try:
                node[leaf] = value
            except TypeError as err:
                raise ConfigError(key, str(err).splitlines()[0]) from None
        if key == "objective" and objective_groups is not None:
            with config.unlocked():
                for group, fields in objective_groups(value).items():
                    if group not in config:
                        config[group] = fields
    return config


def lookup(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(key, "is missing")
        node = node[part]
    return node


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def lr(config) -> float:
    """Peak learning rate: ``base_lr * batch_size / base_batch`` (MAE's linear scaling rule)."""
    return config.optim.base_lr * config.batch_size / config.optim.base_batch


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
    return int(math.ceil(epochs * num_examples / batch_size))
