"""ViT shapes, dtypes, layout helpers, logical names, remat, and scan compile time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import sharding
from maskjax.models import layers, vit


def encoder(**kw):
    """A small ViT; keywords of :class:`layers.Transformer` (``mlp_ratio``: its MLP width) or of the encoder."""
    blocks = dict(width=32, depth=2, heads=4, mlp_ratio=4.0)
    blocks.update({k: kw.pop(k) for k in list(kw) if k in ("width", "depth", "heads", "mlp_ratio", "dtype", "remat",
                                                               "qkv_bias", "norm_eps", "attention",
                                                               "scan_layers", "pre_norm")})
    blocks["mlp_dim"] = int(blocks["width"] * blocks.pop("mlp_ratio"))
    blocks["dtype"] = layers.compute_dtype(blocks.get("dtype", "float32"))
    args = dict(patch_dim=48, grid=(1, 4, 4), rngs=nnx.Rngs(0))
    args.update(kw)
    return vit.ViTEncoder(layers.Transformer(**blocks), **args)


@pytest.mark.parametrize("dtype,expected", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_encoder_shapes_and_dtypes(dtype, expected):
    enc = encoder(dtype=dtype)
    patches = jnp.ones((3, 16, 48))
    full = enc(patches)
    assert full.shape == (3, 17, 32) and full.dtype == expected
    kept = enc(patches, jnp.tile(jnp.arange(4)[None], (3, 1)))
    assert kept.shape == (3, 5, 32)
    assert enc.features(patches).shape == (3, 32) and enc.features(patches).dtype == jnp.float32
    params = nnx.state(enc, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)), "parameters stay float32"


def test_encoder_without_cls_and_one_hot_gather_matches_take():
    enc = encoder(cls_token=False)
    patches = jax.random.normal(jax.random.key(1), (2, 16, 48))
    idx = jnp.array([[3, 1, 7, 0], [15, 2, 9, 4]])
    take = enc(patches, idx)
    enc.one_hot_gather = True
    onehot = enc(patches, idx)
    assert take.shape == (2, 4, 32)
    np.testing.assert_allclose(np.asarray(take), np.asarray(onehot), atol=1e-5)


def test_video_encoder_tubelets():
    grid = vit.token_grid(16, 4, frames=4, tubelet=2)
    assert grid == (2, 4, 4)
    video = jnp.ones((2, 4, 16, 16, 3))
    patches = vit.patchify(video, 4, 2)
    assert patches.shape == (2, 32, 2 * 4 * 4 * 3)
    enc = encoder(patch_dim=96, grid=grid)
    assert enc(patches).shape == (2, 33, 32)


@pytest.mark.parametrize("shape,tubelet", [((2, 16, 16, 3), 1), ((2, 4, 8, 8, 1), 2)])
def test_patchify_roundtrip_and_layout(shape, tubelet):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    p = vit.patchify(x, 4, tubelet)
    np.testing.assert_array_equal(np.asarray(vit.unpatchify(p, shape[1:], 4, tubelet)), np.asarray(x))
    if len(shape) == 4:  # first patch is the top-left 4x4 block, row-major, channels last
        np.testing.assert_array_equal(np.asarray(p[0, 0]), np.asarray(x[0, :4, :4].reshape(-1)))


def test_sincos_positions_are_distinct_and_bounded():
    emb = vit.sincos_pos_embed(64, (1, 4, 4))
    assert emb.shape == (16, 64)
    assert np.abs(emb).max() <= 1.0
    assert len({row.tobytes() for row in emb}) == 16
    emb3 = vit.sincos_pos_embed(64, (2, 4, 4))
    assert emb3.shape == (32, 64) and len({row.tobytes() for row in emb3}) == 32


def test_every_parameter_has_logical_names():
    enc = encoder()
    axes = sharding.logical_axes(nnx.state(enc, nnx.Param))
    params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
    for names, value in zip(jax.tree.leaves(axes), jax.tree.leaves(params)):
        assert isinstance(names, sharding.Names) and len(names) == value.ndim
    flat = {jax.tree_util.keystr(p): n for p, n in jax.tree_util.tree_flatten_with_path(axes)[0]}
    assert flat["['blocks']['blocks']['attn']['query']"] == ("layers", "embed", "heads", "kv")
    assert flat["['blocks']['blocks']['mlp']['fc1']['kernel']"] == ("layers", "embed", "mlp")


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_values_and_gradients(policy):
    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    x = jax.random.normal(jax.random.key(2), (2, 16, 48))
    plain, remat = encoder(), encoder(remat=policy)
    g1 = nnx.grad(loss)(plain, x)
    g2 = nnx.grad(loss)(remat, x)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pre_norm,remat", [(True, "none"), (False, "none"), (True, "dots")])
def test_unrolled_layers_give_the_scans_values_and_gradients(pre_norm, remat):
    """``scan_layers=False`` runs the same stacked parameters in a Python loop: same outputs, same
    gradients (stacked the same way), pre- and post-norm, with remat."""
    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    x = jax.random.normal(jax.random.key(3), (2, 16, 48))
    scanned = encoder(depth=3, pre_norm=pre_norm, remat=remat)
    unrolled = encoder(depth=3, pre_norm=pre_norm, remat=remat, scan_layers=False)
    for a, b in zip(jax.tree.leaves(nnx.state(scanned, nnx.Param)), jax.tree.leaves(nnx.state(unrolled, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same seed, same stacked layout
    np.testing.assert_allclose(np.asarray(unrolled(x)), np.asarray(scanned(x)), rtol=1e-5, atol=1e-6)
    g1, g2 = nnx.grad(loss)(scanned, x), nnx.grad(loss)(unrolled, x)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_unrolled_layers_collect_every_blocks_mlp_output_like_the_scan():
    t = layers.Transformer(width=32, depth=3, heads=4, mlp_dim=64)
    scanned = layers.Stack(t, rngs=nnx.Rngs(0))
    unrolled = layers.Stack(dataclasses.replace(t, scan_layers=False), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 8, 32))
    (y1, c1), (y2, c2) = scanned(x, collect=True), unrolled(x, collect=True)
    assert c1.shape == c2.shape == (3, 2, 8, 32)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c2), np.asarray(c1), rtol=1e-5, atol=1e-6)


def test_layer_fence_is_the_identity_both_ways_and_survives_xla():
    x = jnp.asarray([[np.nan, 1.0, -0.0], [np.inf, 2.0, 3.0]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.layer_fence)(x)), np.asarray(x))
    g = jax.jit(jax.grad(lambda v: jnp.sum(layers.layer_fence(v) * jnp.arange(6.0).reshape(2, 3))))(jnp.ones((2, 3)))
    np.testing.assert_array_equal(np.asarray(g), np.arange(6.0).reshape(2, 3))
    # the fence must reach the optimized program as a conditional (XLA:CPU drops optimization barriers)
    text = jax.jit(layers.layer_fence).lower(jnp.ones((4, 4))).compile().as_text()
    assert "conditional(" in text


def test_gelu_matches_pytorch_values_and_gradients():
    """The GELU whose backward pass keeps only its input, against torch's exact GELU (forward and
    autograd backward) on the same inputs, and against JAX's autodiff of the erf form."""
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-8, 8, 1001), np.random.default_rng(0).normal(0, 3, 1000)]).astype(np.float32)
    cot = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.gelu(xt)
    yt.backward(torch.tensor(cot))
    y, vjp = jax.vjp(layers.gelu, jnp.asarray(x))
    (g,) = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    _, auto = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), np.asarray(auto(jnp.asarray(cot))[0]), rtol=1e-5, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb, vjpb = jax.vjp(layers.gelu, xb)
    assert yb.dtype == vjpb(jnp.ones_like(xb))[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_layer_norm_matches_pytorch_values_and_gradients(eps):
    """maskjax's LayerNorm (one-pass statistics, hand-written backward) against torch's layer_norm and its
    autograd on the same input, scale, shift and output gradient; a row offset by 4 of its spreads (the
    one-pass variance loses digits as mean^2 / variance grows, as Flax's does) and a constant row included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 48)).astype(np.float32)
    x[0] += 4.0
    x[1, 2] = 7.0
    scale, shift = rng.normal(size=48).astype(np.float32), rng.normal(size=48).astype(np.float32)
    cot = rng.normal(size=x.shape).astype(np.float32)
    xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, shift))
    yt = torch.nn.functional.layer_norm(xt, (48,), st, bt, eps)
    yt.backward(torch.tensor(cot))
    y, vjp = jax.vjp(lambda *a: layers.layer_norm(*a, eps), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(shift))
    grads = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=1e-4, atol=2e-5)
    for ours, theirs in zip(grads, (xt.grad, st.grad, bt.grad)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=2e-4)
    norm = layers.LayerNorm(48, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, eps=eps)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb, vjpb = jax.vjp(norm, xb)
    assert yb.dtype == jnp.bfloat16 and vjpb(jnp.ones_like(yb))[0].dtype == jnp.bfloat16


def _program_size(depth: int) -> int:
    """Characters of the lowered train-step program (StableHLO) of an encoder of ``depth`` blocks."""
    model = encoder(depth=depth, width=64, heads=4)
    graphdef, params = nnx.split(model)

    def loss(p, x):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    return len(jax.jit(jax.grad(loss)).lower(params, jnp.ones((2, 16, 48))).as_text())


def test_scan_keeps_the_program_flat_in_depth():
    """Blocks are scanned, so the program (and with it compile time) does not grow with depth: one block
    body whatever the depth; unrolled, depth 24 would be about four times depth 6."""
    shallow, deep = _program_size(6), _program_size(24)
    assert deep <= 1.05 * shallow, f"depth 24 lowers to {deep} characters vs depth 6 to {shallow}"


@pytest.mark.parametrize("call,match", [
    (lambda: vit.token_grid(30, 4), "image_size=30 is not divisible by patch_size=4"),
    (lambda: vit.token_grid(16, 4, frames=5, tubelet=2), "frames=5"),
    (lambda: vit.token_grid(16, 0), "patch_size=0"),
    (lambda: layers.Attention(30, 4, rngs=nnx.Rngs(0)), "heads=4"),
    (lambda: layers.compute_dtype("float8"), "dtype='float8'"),
    (lambda: encoder(remat="some"), "remat='some'"),
    (lambda: layers.Attention(32, 4, rngs=nnx.Rngs(0), attention="flash"), "attention='flash'"),
])
def test_bad_model_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("mode,dtype,head_dim,length,masked,platform,expected", [
    ("auto", jnp.bfloat16, 64, 197, False, "cpu", "xla"),
    ("auto", jnp.bfloat16, 64, 197, False, "gpu", "cudnn"),
    ("auto", jnp.float16, 128, 512, True, "gpu", "cudnn"),
    ("auto", jnp.float32, 64, 197, False, "gpu", "xla"),      # cuDNN flash attention is half precision only
    ("auto", jnp.bfloat16, 20, 197, False, "gpu", "xla"),     # head size not a multiple of 8
    ("auto", jnp.bfloat16, 64, 197, True, "gpu", "xla"),      # masked (packed) with an odd length
    ("xla", jnp.bfloat16, 64, 512, False, "gpu", "xla"),
    ("cudnn", jnp.bfloat16, 64, 512, False, "gpu", "cudnn"),
    ("cudnn", jnp.bfloat16, 64, 512, False, "cpu", "needs a CUDA GPU"),
    ("cudnn", jnp.float32, 64, 512, False, "gpu", "needs model.dtype bfloat16 or float16"),
])
def test_attention_implementation_choice(mode, dtype, head_dim, length, masked, platform, expected):
    if expected in ("xla", "cudnn"):
        assert layers.attention_implementation(mode, dtype, head_dim, length, masked, platform) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            layers.attention_implementation(mode, dtype, head_dim, length, masked, platform)


def test_auto_attention_asks_jax_for_cudnn_on_a_gpu_in_bfloat16(monkeypatch):
    """Which kernel the module runs when the backend is a GPU (faked: this machine has none; the cuDNN
    call itself then runs jax's XLA attention so the test can finish), and that both layouts (cuDNN's
    [batch, length, heads, head_dim], xla_attention's heads-major) give the same layer output, biases
    and rotary positions included."""
    asked = []
    real_jax, real_xla = jax.nn.dot_product_attention, layers.xla_attention

    def jax_attention(*args, implementation=None, **kw):
        asked.append(implementation)
        return real_jax(*args, implementation="xla", **kw)

    def xla_attention(*args):
        asked.append("xla")
        return real_xla(*args)

    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", jax_attention)
    monkeypatch.setattr(layers, "xla_attention", xla_attention)
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    rope = layers.rotary_tables(jnp.broadcast_to(jnp.arange(8), (2, 8)), 8)
    module = layers.Attention(32, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, qkv_bias=True)
    for name in ("query_bias", "key_bias", "value_bias"):
        getattr(module, name)[...] = jax.random.normal(jax.random.key(len(name)), (4, 8))
    on_cpu = module(x, rope=rope)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    on_gpu = module(x, rope=rope)                                           # head size 8: cuDNN
    np.testing.assert_allclose(np.asarray(on_gpu, np.float32), np.asarray(on_cpu, np.float32), atol=0.05)
    layers.Attention(32, 4, rngs=nnx.Rngs(0), dtype=jnp.float32)(x)        # float32: XLA
    layers.Attention(32, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, attention="xla")(x)
    layers.Attention(36, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)(jnp.ones((2, 8, 36)))  # head size 12: XLA
    assert asked == ["xla", "cudnn", "xla", "xla", "xla"]


@pytest.mark.parametrize("masked", [False, True])
def test_xla_attention_values_and_gradients_match_jax(masked):
    """xla_attention (heads-major, flash-style backward) against jax.nn.dot_product_attention, incl. a
    query row with nothing to attend to (uniform probabilities, no gradient through its scores)."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(keys[i], (2, 13, 4, 8)) for i in range(3))
    mask = None
    if masked:
        mask = jax.random.bernoulli(keys[3], 0.6, (2, 1, 13, 13)).at[0, 0, 3].set(False)
    heads_major = lambda a: a.transpose(0, 2, 1, 3)

    def ours(q, k, v):
        return heads_major(layers.xla_attention(heads_major(q), heads_major(k), heads_major(v), mask))

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(8.0))
    for mine, ref in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(theirs), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(mine, ref, atol=1e-5)


def test_attention_option_reaches_every_block_and_xla_matches_auto_on_cpu():
    from maskjax import config as config_lib, objectives
    config = config_lib.override(config_lib.load("configs/mae_digits.py"), ["model.attention=xla"])
    model = objectives.get(config).build(nnx.Rngs(0))
    assert model.encoder.blocks.blocks.attn.attention == "xla"
    assert model.decoder.blocks.blocks.attn.attention == "xla"
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    auto = layers.Attention(32, 4, rngs=nnx.Rngs(0))
    xla = layers.Attention(32, 4, rngs=nnx.Rngs(0), attention="xla")
    np.testing.assert_array_equal(auto(x), xla(x))  # 'auto' is XLA on CPU
    with pytest.raises(ValueError, match="attention='cudnn' needs a CUDA GPU"):
        layers.Attention(32, 4, rngs=nnx.Rngs(0), attention="cudnn")(x)


def test_constraints_outside_a_mesh_context_fail_loudly():
    """A model traced without ``activation_mesh`` would compile unconstrained and silently change the
    layout on a sharded mesh; instead it raises, in a thread that entered no context."""
    import threading

    errors = []

    def run():
        try:
            sharding.constrain(jnp.ones((4, 3)), ("batch", None))
        except sharding.MeshError as err:
            errors.append(str(err))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "activation_mesh" in errors[0]
    with sharding.activation_mesh(None):  # explicit: unconstrained
        assert sharding.constrain(jnp.ones((4, 3)), ("batch", None)).shape == (4, 3)


def test_sharding_rules_override_the_table_and_name_bad_entries():
    table = dict(sharding.rules_with((("embed", None), ("act_embed", "tensor"), ("mlp", ["tensor", "fsdp"]))))
    assert table["embed"] is None and table["act_embed"] == "tensor" and table["mlp"] == ("tensor", "fsdp")
    assert table["heads"] == dict(sharding.RULES)["heads"]  # the rest untouched
    cases = [((("batch", None),), "'batch'"), ((("embd", None),), "'embd'"), ((("embed", "model"),), "'model'"),
             (("embed",), "pair")]
    for bad, named in cases:
        with pytest.raises(sharding.MeshError, match=named):
            sharding.rules_with(bad)
