"""Transformer building blocks (Flax NNX) with logical axis names on every parameter.

Parameters are float32; each layer casts them and its input to the compute ``dtype`` at call time.
Attention is :func:`xla_attention` (heads-major, flash attention's backward pass), cuDNN's fused
flash attention through ``jax.nn.dot_product_attention`` on a CUDA GPU in bfloat16/float16, or Pallas's
splash attention on a TPU (:func:`splash_attention`); ``model.attention``, see
:func:`attention_implementation`. Who may attend to whom is a :class:`Segments` value (segment ids of
queries and keys, causal or not), which every kernel reads in its own form.
Blocks are stacked with ``nnx.vmap`` at construction and run with ``nnx.scan``, so compile time does
not grow with depth, or (``model.scan_layers`` False) by an unrolled loop over the same parameters, which
steps faster on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from maskjax import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} must be one of {tuple(DTYPES)}")
    return DTYPES[name]


# What a parameter is for. The optimizer decides weight decay from this (``optim.decay_roles``), never
# from the number of axes: q/k/v biases have two axes and projection kernels may have one named axis.
# 'statistic': state kept among the parameters but never trained (used under stop_gradient, so its
# gradient and optimizer update are exactly zero) and rewritten by the objective's ``after_update``
# (a VQ codebook learned by EMA and the statistics it is computed from).
ROLES = ("kernel", "embedding", "position", "token", "bias", "norm", "temperature", "statistic")


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None], role: str) -> nnx.Param:
    """A float32 parameter tagged with logical axis names (sharded later by the trainer) and its
    ``role`` (one of :data:`ROLES`: a weight matrix, a token-embedding table, a position table, a
    cls/mask token, a bias, a norm scale or shift, a temperature)."""
    if role not in ROLES:
        raise ValueError(f"role={role!r} must be one of {ROLES}")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes),
                     eager_sharding=False, role=role)


def param_roles(state: nnx.State):
    """Pure-dict tree of each parameter's role, parallel to ``nnx.to_pure_dict(state)``."""
    return nnx.to_pure_dict(jax.tree.map(lambda var: var.get_metadata()["role"], state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


ATTENTION = ("auto", "xla", "cudnn", "splash", "splash_interpret")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "kv", "mask"], meta_fields=["causal"])
@dataclasses.dataclass(frozen=True)
class Segments:
    """Who may attend to whom: query i of row b attends key j iff ``q[b, i] == kv[b, j]`` (and, when
    ``causal``, j <= i). Ids are int32 >= 0 ([batch, q_len] and [batch, kv_len]). This one form covers
    packed text (:meth:`packed`: padding is segment 0 and attends to padding, so no row is empty) and
    keys hidden from every query (:meth:`keys`: MAE's dual masking), and each kernel takes it its own
    way: splash attention as segment ids, XLA and cuDNN as the dense mask (:meth:`dense`), built once
    per stack (:meth:`with_dense`) rather than in every layer of the scan."""
    q: jax.Array
    kv: jax.Array
    causal: bool = False
    mask: jax.Array | None = None

    @classmethod
    def packed(cls, segment_ids: jax.Array, causal: bool = False) -> "Segments":
        ids = segment_ids.astype(jnp.int32)
        return cls(ids, ids, causal)

    @classmethod
    def keys(cls, valid: jax.Array, q_len: int) -> "Segments":
        """Every one of ``q_len`` queries attends exactly the keys where ``valid`` [batch, kv_len] is True."""
        return cls(jnp.ones((valid.shape[0], q_len), jnp.int32), valid.astype(jnp.int32))

    def dense(self) -> jax.Array:
        """[batch, 1, q_len, kv_len] bool, True = may attend."""
        if self.mask is not None:
            return self.mask
        mask = self.q[:, None, :, None] == self.kv[:, None, None, :]
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((self.q.shape[1], self.kv.shape[1]), bool))
        return mask

    def with_dense(self) -> "Segments":
        return dataclasses.replace(self, mask=self.dense())


@dataclasses.dataclass(frozen=True)
class Transformer:
    """One stack of blocks: everything its layers share, passed down whole (constructors take this
    value instead of threading each option through encoder -> Stack -> Block -> Attention).

    ``dtype`` is the compute dtype (parameters stay float32); ``remat`` a key of ``REMAT_POLICIES``;
    ``attention`` one of :data:`ATTENTION`; ``pre_norm`` False is BERT's post-norm block;
    ``one_hot_gather`` selects tokens (MAE's kept tokens) by a one-hot einsum instead of a gather;
    ``scan_layers`` False unrolls the layer loop (:class:`Stack`)."""
    width: int
    depth: int
    heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    pre_norm: bool = True
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    attention: str = "auto"
    remat: str = "none"
    one_hot_gather: bool = False
    scan_layers: bool = True

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be >= 1")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} must be one of {tuple(REMAT_POLICIES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r} must be one of {ATTENTION}")
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")

    @classmethod
    def from_model(cls, model, *, width: int | None = None, depth: int | None = None, heads: int | None = None,
                   mlp_ratio: float | None = None, mlp_dim: int | None = None, pre_norm: bool = True) -> "Transformer":
        """The stack ``config.model`` describes (its dtype, remat, attention, q/k/v bias and norm eps),
        with the given sizes replacing its own (a decoder, a text tower, ELECTRA's generator)."""
        width = width or model.width
        mlp_dim = mlp_dim or int(width * (mlp_ratio or model.mlp_ratio))
        return cls(width=width, depth=depth or model.depth, heads=heads or model.heads,
                   mlp_dim=mlp_dim, dtype=compute_dtype(model.dtype),
                   pre_norm=pre_norm, qkv_bias=model.qkv_bias, norm_eps=model.norm_eps, attention=model.attention,
                   remat=model.remat, one_hot_gather=model.one_hot_gather, scan_layers=model.scan_layers)


def cudnn_unsupported(dtype, head_dim: int | None = None, length: int | None = None, masked: bool = False,
                      platform: str | None = None) -> str | None:
    """Why cuDNN flash attention cannot run this attention (None when it can): it needs a CUDA GPU,
    float16/bfloat16, a head dimension that is a multiple of 8 and at most 128 (256 on Hopper and
    later; 128 is the bound checked here) and, with a mask (packed text), even sequence lengths.
    Without ``head_dim`` only the platform and dtype are checked."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda"):
        return f"needs a CUDA GPU (this run is on {platform})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"needs model.dtype bfloat16 or float16 (got {jnp.dtype(dtype).name})"
    if head_dim is not None and (head_dim % 8 or head_dim > 128):
        return f"needs a head dimension that is a multiple of 8 and <= 128 (got {head_dim})"
    if masked and length is not None and length % 2:
        return f"needs an even sequence length with a mask (got {length})"
    return None


def splash_unsupported(platform: str | None = None) -> str | None:
    """Why splash attention cannot run here (None when it can): its kernel is written for TPUs."""
    platform = platform or jax.default_backend()
    if platform != "tpu":
        return (f"needs a TPU (this run is on {platform}); 'splash_interpret' runs the same kernel in Pallas's "
                "interpreter on any backend, to check it")
    return None


def attention_implementation(mode: str, dtype, head_dim: int, length: int | None = None, masked: bool = False,
                             platform: str | None = None) -> str:
    """The kernel ``model.attention`` = ``mode`` runs: 'auto' takes cuDNN flash attention on a GPU wherever
    it can run (:func:`cudnn_unsupported`), splash attention on a TPU, and XLA elsewhere; 'cudnn' and
    'splash' insist (a ValueError saying why not); 'splash_interpret' is splash attention in Pallas's TPU
    interpreter, on any backend (slow: for correctness checks on CPU)."""
    if mode not in ATTENTION:
        raise ValueError(f"attention={mode!r} must be one of {ATTENTION}")
    if mode in ("xla", "splash_interpret"):
        return mode
    platform = platform or jax.default_backend()
    if mode == "splash" or (mode == "auto" and platform == "tpu"):
        why = splash_unsupported(platform)
        if why is not None:
            raise ValueError(f"attention='splash' {why}")
        return "splash"
    why = cudnn_unsupported(dtype, head_dim, length, masked, platform)
    if why is None:
        return "cudnn"
    if mode == "cudnn":
        raise ValueError(f"attention='cudnn' {why}")
    return "xla"


def _attention_scores(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Scaled float32 scores [batch, heads, q_len, kv_len]; masked-out pairs get a large negative value
    (as in ``jax.nn.dot_product_attention``, so a row with nothing to attend to is uniform, not NaN)."""
    s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)
    return s


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v [batch, heads, length, head_dim] (heads-major);
    ``mask`` as in :class:`Attention`. The values of ``jax.nn.dot_product_attention(implementation=
    'xla')``, with two changes that make a ViT-B MAE train step on CPU ~12% faster (8-layer decoder on
    197 tokens; docs/performance.md):

    - heads-major operands: every matmul here is a plain batched GEMM over (batch, heads), where
      the [batch, length, heads, head_dim] layout makes XLA transpose operands and outputs around
      them;
    - the backward pass of flash attention: it keeps q, k, v, the output and each row's max and sum,
      not the [heads, length, length] probabilities, recomputes those from q and k, and takes the
      softmax gradient's row sums from the output (sum_s p*dp = sum_h do*o). In a layer scan this
      saves stacking two probability tensors per layer and a reduction over each.
    """
    return _xla_attention_fwd(q, k, v, mask)[0]


def _xla_attention_fwd(q, k, v, mask):
    s = _attention_scores(q, k, mask)
    top = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bnts,bnsh->bnth", (e / total).astype(v.dtype), v)
    return out, (q, k, v, mask, out, top, total)


def _xla_attention_bwd(residuals, d_out):
    q, k, v, mask, out, top, total = residuals  # (top, total), not their log-sum-exp: exact for masked rows
    p = jnp.exp(_attention_scores(q, k, mask) - top) / total
    d_v = jnp.einsum("bnts,bnth->bnsh", p.astype(v.dtype), d_out)
    d_p = jnp.einsum("bnth,bnsh->bnts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("bnth,bnth->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    d_s = p * (d_p - row) * (q.shape[-1] ** -0.5)
    if mask is not None:  # a masked-out score has no gradient (it only matters in rows with nothing to see)
        d_s = jnp.where(mask, d_s, 0.0)
    d_s = d_s.astype(q.dtype)
    d_q = jnp.einsum("bnts,bnsh->bnth", d_s, k)
    d_k = jnp.einsum("bnts,bnth->bnsh", d_s, q)
    return d_q, d_k, d_v, None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


SPLASH_LANES = 128  # the kernel's key blocks are whole multiples of a TPU vector register's 128 lanes


def _splash_block(length: int) -> int:
    """The largest of 512, 256, 128 dividing ``length`` (a multiple of 128): bigger blocks keep the
    TPU's matrix unit busier, and 512 is where MaxText's splash defaults stop."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: Segments | None = None, *,
                     interpret: bool = False) -> jax.Array:
    """:func:`xla_attention`'s values through Pallas's splash attention kernel (TPU; ``interpret`` runs
    it in Pallas's interpreter on any backend). q, k, v [batch, heads, length, head_dim].

    The kernel takes lengths in whole 128-token blocks, so other lengths (ViT's 197, MAE's visible
    tokens) are padded, and the padding gets its own segment id (-1): real queries never see it and
    padded queries see only each other, so no row is empty. Segments become the kernel's segment ids;
    ``causal`` its causal block mask, whose fully masked blocks it skips. The kernel is one Pallas call
    that XLA cannot partition, so it runs per device on its shard of batch and heads
    (:func:`sharding.per_shard`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    batch, _, length, head_dim = q.shape
    if k.shape[2] != length:
        raise ValueError(f"splash_attention is self-attention: {length} queries but {k.shape[2]} keys")
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    causal = segments is not None and segments.causal
    ids: tuple = ()
    if segments is not None or padded != length:
        q_ids = segments.q if segments is not None else jnp.zeros((batch, length), jnp.int32)
        kv_ids = segments.kv if segments is not None else q_ids
        ids = tuple(jnp.pad(a.astype(jnp.int32), ((0, 0), (0, padded - length)), constant_values=-1)
                    for a in (q_ids, kv_ids))
    if padded != length:
        q, k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, padded - length), (0, 0))) for a in (q, k, v))
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # the kernel does not scale

    def local(q, k, v, *ids):
        shape = (padded, padded)
        one = masks.CausalMask(shape) if causal else masks.FullMask(shape)
        b = _splash_block(padded)
        sizes = kernel.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                  block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
        run = kernel.make_splash_mha(masks.MultiHeadMask([one] * q.shape[1]), block_sizes=sizes, head_shards=1,
                                     q_seq_shards=1, interpret=interpret)
        if ids:
            return jax.vmap(lambda q, k, v, a, b: run(q, k, v, kernel.SegmentIds(a, b)))(q, k, v, *ids)
        return jax.vmap(run)(q, k, v)

    heads_major, rows = ("batch", "act_heads", None, None), ("batch", None)
    out = sharding.per_shard(local, (q, k, v, *ids), (heads_major,) * 3 + (rows,) * len(ids), heads_major)
    return out[:, :, :length]


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` over the last axis. axes: logical names of (in, out)."""

    def __init__(self, din: int, dout: int, axes: tuple, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 use_bias: bool = True, init: Callable = xavier):
        self.kernel = param(rngs, init, (din, dout), axes, "kernel")
        self.bias = param(rngs, zeros, (dout,), axes[1:], "bias") if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _ln_stats(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32 (the result is float32). The variance is E[x^2] - E[x]^2
    (clamped at 0): both means in one pass over x, as Flax's LayerNorm does by default (3.6-5% of a ViT-B
    MAE step on CPU against the two-pass E[(x - E[x])^2]). The backward pass keeps x, the mean and
    1/std and computes dx = (g s - mean(g s) - xhat mean(g s xhat)) / std in one expression, as PyTorch's
    LayerNorm backward does; autodiff of the forward formula keeps more and takes more passes
    (docs/performance.md)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean, rstd = _ln_stats(x32, eps)
    return (x32 - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    gs = g * scale
    axes = tuple(range(g.ndim - 1))
    dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (:func:`layer_norm`), the result cast to the compute dtype."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, eps: float = 1e-6):
        self.scale = param(rngs, ones, (dim,), ("embed",), "norm")
        self.bias = param(rngs, zeros, (dim,), ("embed",), "norm")
        self.dtype, self.eps = dtype, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention. x: [batch, length, embed] -> [batch, length, embed].

    ``segments``: optional :class:`Segments` (packed text, causal text, MAE's dual masking); None = every
    token attends every token. ``rope``: optional (sin, cos) from :func:`rotary_tables` for rotary
    positions on queries and keys. ``qkv_bias``: biases on the query, key and value projections
    (BERT, timm's ViT and the MAE release have them; the small recipes do not). ``attention``: one of
    :data:`ATTENTION`, resolved per call by :func:`attention_implementation`.
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, qkv_bias: bool = False,
                 attention: str = "auto"):
        if dim % heads:
            raise ValueError(f"heads={heads} must divide width={dim}")
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r} must be one of {ATTENTION}")
        head_dim = dim // heads
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        self.query = param(rngs, init, (dim, heads, head_dim), ("embed", "heads", "kv"), "kernel")
        self.key = param(rngs, init, (dim, heads, head_dim), ("embed", "heads", "kv"), "kernel")
        self.value = param(rngs, init, (dim, heads, head_dim), ("embed", "heads", "kv"), "kernel")
        if qkv_bias:
            self.query_bias, self.key_bias, self.value_bias = (
                param(rngs, zeros, (heads, head_dim), ("heads", "kv"), "bias") for _ in range(3))
        else:
            self.query_bias = self.key_bias = self.value_bias = None
        out_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        self.out = param(rngs, out_init, (heads, head_dim, dim), ("heads", "kv", "embed"), "kernel")
        self.out_bias = param(rngs, zeros, (dim,), ("embed",), "bias")
        self.dtype, self.attention = dtype, attention

    def __call__(self, x: jax.Array, segments: Segments | None = None, rope: tuple | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        cast = lambda p: p[...].astype(self.dtype)
        implementation = attention_implementation(self.attention, self.dtype, self.query.shape[-1], x.shape[1],
                                                  segments is not None)
        # cuDNN takes [batch, length, heads, head_dim]; XLA's matmuls run best heads-major (xla_attention)
        layout = "blnh" if implementation == "cudnn" else "bnlh"
        names = {"b": "batch", "l": "act_length", "n": "act_heads", "h": "act_kv"}
        def project(kernel, bias):
            y = jnp.einsum(f"bld,dnh->{layout}", x, cast(kernel))
            if bias is not None:
                y = y + cast(bias)[:, None, :] if layout == "bnlh" else y + cast(bias)
            return sharding.constrain(y, tuple(names[a] for a in layout))

        q, k, v = (project(self.query, self.query_bias), project(self.key, self.key_bias),
                   project(self.value, self.value_bias))
        if rope is not None:
            q, k = apply_rotary(q, rope, layout), apply_rotary(k, rope, layout)
        mask = None if segments is None or implementation.startswith("splash") else segments.dense()
        if implementation == "cudnn":
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        elif implementation.startswith("splash"):
            y = splash_attention(q, k, v, segments, interpret=implementation == "splash_interpret")
        else:
            y = xla_attention(q, k, v, mask)
        return jnp.einsum(f"{layout},nhd->bld", y, cast(self.out)) + cast(self.out_bias)


def rotary_tables(positions: jax.Array, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) [batch, length, head_dim // 2] for integer ``positions`` [batch, length] (RoPE)."""
    freqs = 1.0 / base ** (jnp.arange(head_dim // 2, dtype=jnp.float32) / (head_dim // 2))
    angles = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, rope: tuple[jax.Array, jax.Array], layout: str = "blnh") -> jax.Array:
    """Rotates pairs (i, i + head_dim/2) of x by the position angles; ``layout``: x's axes, 'blnh'
    ([batch, length, heads, head_dim]) or 'bnlh' (heads-major)."""
    sin, cos = (t[:, :, None, :] if layout == "blnh" else t[:, None, :, :] for t in rope)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``jax.nn.gelu(x, approximate=False)``, whose backward pass keeps only x.

    Autodiff of the erf form keeps several [batch, length, mlp] intermediates per block, and a layer scan
    stacks each of them for the backward pass (in a BERT-base step on CPU, four stacked writes and reads
    per block). Here the derivative Phi(x) + x phi(x) is recomputed from x in the backward pass, as
    PyTorch's GELU backward does."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (2.0 ** -0.5)))
    pdf = jnp.exp(-0.5 * jnp.square(x32)) * ((2.0 * jnp.pi) ** -0.5)
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _opaque_identity(x: jax.Array) -> jax.Array:
    # XLA drops optimization barriers before fusion on CPU, but keeps a conditional whose predicate it
    # cannot fold (read from the data here); both branches return x, NaN or not.
    flat = x.reshape(-1)
    return jax.lax.cond(flat[0] == flat[0], lambda t: t, lambda t: t * 1.0, x)


@jax.custom_vjp
def layer_fence(x: jax.Array) -> jax.Array:
    """The identity, in the forward and the backward pass, that XLA cannot fuse across.

    Between unrolled pre-norm blocks the residual stream's gradient is a chain of elementwise sums over
    every layer, and XLA:CPU fuses that chain (with each layer's LayerNorm backward) into the consumers
    that need it, recomputing it per consumer: a ViT-B MAE step unrolled without this fence ran 1.5x
    slower than the scan, with it 1.06x faster (docs/performance.md)."""
    return _opaque_identity(x)


layer_fence.defvjp(lambda x: (_opaque_identity(x), None), lambda _, g: (_opaque_identity(g),))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.fc1 = Dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = sharding.constrain(gelu(self.fc1(x)), ("batch", "act_length", "act_mlp"))
        return self.fc2(h)


class Block(nnx.Module):
    """Transformer block; pre-norm (ViT, MAE) or post-norm (original BERT)."""

    def __init__(self, t: Transformer, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(t.width, rngs=rngs, dtype=t.dtype, eps=t.norm_eps)
        self.attn = Attention(t.width, t.heads, rngs=rngs, dtype=t.dtype, qkv_bias=t.qkv_bias, attention=t.attention)
        self.norm2 = LayerNorm(t.width, rngs=rngs, dtype=t.dtype, eps=t.norm_eps)
        self.mlp = Mlp(t.width, t.mlp_dim, rngs=rngs, dtype=t.dtype)
        self.pre_norm = t.pre_norm

    def __call__(self, x: jax.Array, segments: Segments | None = None, rope: tuple | None = None,
                 collect: bool = False):
        """x [batch, length, width] -> the same; with ``collect`` also the MLP's output before the residual
        sum (data2vec's per-layer targets: ``ffn_targets`` in fairseq's ``AltBlock``)."""
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), segments, rope)
            ffn = self.mlp(self.norm2(x))
            x = x + ffn
        else:
            x = self.norm1(x + self.attn(x, segments, rope))
            ffn = self.mlp(x)
            x = self.norm2(x + ffn)
        x = sharding.constrain(x, ("batch", "act_length", "act_embed"))
        return (x, ffn) if collect else x


class Stack(nnx.Module):
    """``t.depth`` identical blocks with stacked parameters (leading ``layers`` axis), run by a scan or,
    with ``t.scan_layers`` False, by a loop unrolled at trace time over the same stacked parameters (so
    checkpoints do not depend on the choice); each block rematerialised by ``t.remat``."""

    def __init__(self, t: Transformer, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=t.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return Block(t, rngs=rngs)

        self.blocks = make(rngs)
        self.remat, self.scan, self.depth = t.remat, t.scan_layers, t.depth

    def __call__(self, x: jax.Array, segments: Segments | None = None, rope: tuple | None = None,
                 collect: bool = False):
        """x [batch, length, dim]; segments: see :class:`Attention`; rope: :func:`rotary_tables` output.
        ``collect``: also return every block's MLP output, stacked [depth, batch, length, dim]."""
        # The dense mask (XLA, cuDNN) is built here, outside the scan: inside, each layer would save its
        # own copy for the backward pass. Splash attention reads the ids and never uses it (XLA drops it).
        segments = segments.with_dense() if segments is not None else None

        def body(x, block):
            return block(x, segments, rope, collect)

        if self.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat])
        if not self.scan:
            return self._unrolled(body, x, collect)
        out_axes = (nnx.Carry, 0) if collect else nnx.Carry
        return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=out_axes)(x, self.blocks)

    def _unrolled(self, body, x: jax.Array, collect: bool):
        """The scan's result with one traced copy of the block per layer: nothing is stacked for the
        backward pass (the scan writes every saved activation into a [depth, ...] buffer and reads it
        back, and zero-fills those buffers first), at compile time growing with depth."""
        graphdef, state = nnx.split(self.blocks)
        fence = layer_fence if jax.default_backend() == "cpu" else (lambda v: v)
        collected = []
        for i in range(self.depth):
            out = body(x, nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)))
            if collect:
                out, ffn = out
                collected.append(ffn)
            x = fence(out)
        return (x, jnp.stack(collected)) if collect else x


def gather_tokens(x: jax.Array, idx: jax.Array, one_hot: bool = False) -> jax.Array:
    """Selects tokens: x [batch, length, dim], idx [batch, k] -> [batch, k, dim].

    ``one_hot`` uses an einsum with a one-hot matrix, which partitions better than a gather when
    the length axis is sharded (the FLIP trick) at the cost of k*length*dim extra FLOPs.
    """
    if one_hot:
        selector = jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype)
        return jnp.einsum("bkl,bld->bkd", selector, x)
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def transformer_flops(batch: int, length: int, width: int, depth: int, mlp_dim: int) -> int:
    """Forward matmul FLOPs of ``depth`` blocks on [batch, length, width] (2 per multiply-add):
    q/k/v/out projections 8*L*D^2, MLP 4*L*D*M, attention scores and values 4*L^2*D."""
    per_layer = 8 * length * width * width + 4 * length * width * mlp_dim + 4 * length * length * width
    return batch * depth * per_layer
