"""How maskjax parameters map to Hugging Face ``transformers`` tensors: layouts and name rules.

One :class:`Rule` pairs a file tensor with a maskjax parameter and a layout; both directions of
``maskjax export`` / ``init_from`` use the same rules. This module sits below the objectives so an
objective can describe its own transformers architecture (``objectives.base.HFArch``) with them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


# ----------------------------------------------------------------------------------- layouts
# name -> (maskjax array -> file array, (file array, maskjax shape) -> maskjax array); ctx has patch, channels.

def _patch_conv_out(x, ctx):  # [p*p*C (y, x, c), D] -> conv weight [D, C, p, p]
    p, c = ctx["patch"], ctx["channels"]
    return x.reshape(p, p, c, -1).transpose(3, 2, 0, 1)


def _tubelet_conv_out(x, ctx):  # [t*p*p*C (t, y, x, c), D] -> Conv3d weight [D, C, t, p, p]
    p, c, q = ctx["patch"], ctx["channels"], ctx["tubelet"]
    return x.reshape(q, p, p, c, -1).transpose(4, 3, 0, 1, 2)


def _shuffle_conv_out(x, ctx):  # head [D, p*p*C (y, x, c)] -> 1x1 conv [C*p*p (c, y, x), D, 1, 1] + PixelShuffle
    p, c = ctx["patch"], ctx["channels"]
    return x.reshape(-1, p, p, c).transpose(3, 1, 2, 0).reshape(c * p * p, -1)[..., None, None]


def _shuffle_conv_in(y, shape, ctx):
    p, c = ctx["patch"], ctx["channels"]
    return y[..., 0, 0].reshape(c, p, p, -1).transpose(3, 1, 2, 0).reshape(shape)


LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda x, ctx: x, lambda y, shape, ctx: y.reshape(shape)),
    "linear": (lambda x, ctx: x.T, lambda y, shape, ctx: y.T.reshape(shape)),  # [in, out] <-> [out, in]
    "qkv": (lambda x, ctx: x.reshape(x.shape[0], -1).T, lambda y, shape, ctx: y.T.reshape(shape)),  # [D, H, hd]
    "flat": (lambda x, ctx: x.reshape(-1), lambda y, shape, ctx: y.reshape(shape)),  # [H, hd] bias
    "attn_out": (lambda x, ctx: x.reshape(-1, x.shape[-1]).T, lambda y, shape, ctx: y.T.reshape(shape)),  # [H, hd, D]
    "patch_conv": (_patch_conv_out, lambda y, shape, ctx: y.transpose(2, 3, 1, 0).reshape(shape)),
    "tubelet_conv": (_tubelet_conv_out, lambda y, shape, ctx: y.transpose(2, 3, 4, 1, 0).reshape(shape)),
    "shuffle_conv": (_shuffle_conv_out, _shuffle_conv_in),
    "shuffle_bias": (lambda x, ctx: x.reshape(ctx["patch"], ctx["patch"], ctx["channels"]).transpose(2, 0, 1).reshape(-1),
                     lambda y, shape, ctx: y.reshape(ctx["channels"], ctx["patch"], ctx["patch"]).transpose(1, 2, 0)
                     .reshape(shape)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One file tensor <-> one maskjax parameter. ``{i}`` in ``name`` marks a parameter stacked over
    layers (leading axis), written as one tensor per layer."""

    name: str
    path: str  # '/'-joined keys of the parameter dict
    layout: str = "same"


@dataclasses.dataclass
class Group:
    """Rules that are loaded together: a ``required`` group must be complete in an imported file, an
    optional one (a decoder, a head) is loaded when the file has it and kept fresh otherwise."""

    name: str
    rules: list[Rule]
    required: bool = True


def block_rules(layer: str, path: str, names: dict, qkv_bias: bool | tuple[str, ...]) -> list[Rule]:
    """The rules of one stacked transformer block; ``names`` holds the file's sub-module names.
    ``qkv_bias``: True for biases on query, key and value, or the projections that have one in the file
    (VideoMAE: query and value; a key bias shifts every score of a query by the same amount, so the
    softmax never sees it)."""
    rules = []
    biased = ("query", "key", "value") if qkv_bias is True else tuple(qkv_bias or ())
    for proj in ("query", "key", "value"):
        rules.append(Rule(f"{layer}{names['attn']}{proj}.weight", f"{path}attn/{proj}", "qkv"))
        if proj in biased:
            rules.append(Rule(f"{layer}{names['attn']}{proj}.bias", f"{path}attn/{proj}_bias", "flat"))
    rules += [
        Rule(f"{layer}attention.output.dense.weight", f"{path}attn/out", "attn_out"),
        Rule(f"{layer}attention.output.dense.bias", f"{path}attn/out_bias"),
        Rule(f"{layer}{names['norm1']}.weight", f"{path}norm1/scale"),
        Rule(f"{layer}{names['norm1']}.bias", f"{path}norm1/bias"),
        Rule(f"{layer}{names['norm2']}.weight", f"{path}norm2/scale"),
        Rule(f"{layer}{names['norm2']}.bias", f"{path}norm2/bias"),
        Rule(f"{layer}intermediate.dense.weight", f"{path}mlp/fc1/kernel", "linear"),
        Rule(f"{layer}intermediate.dense.bias", f"{path}mlp/fc1/bias"),
        Rule(f"{layer}output.dense.weight", f"{path}mlp/fc2/kernel", "linear"),
        Rule(f"{layer}output.dense.bias", f"{path}mlp/fc2/bias"),
    ]
    return rules


VIT_BLOCK = {"attn": "attention.attention.", "norm1": "layernorm_before", "norm2": "layernorm_after"}
BERT_BLOCK = {"attn": "attention.self.", "norm1": "attention.output.LayerNorm", "norm2": "output.LayerNorm"}


def linear(name: str, path: str) -> list[Rule]:
    return [Rule(f"{name}.weight", f"{path}/kernel", "linear"), Rule(f"{name}.bias", f"{path}/bias")]


def norm(name: str, path: str) -> list[Rule]:
    return [Rule(f"{name}.weight", f"{path}/scale"), Rule(f"{name}.bias", f"{path}/bias")]
