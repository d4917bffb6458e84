"""The attention kernels against an independent reference: splash attention (Pallas, run here in its TPU
interpreter) and cuDNN flash attention (on a GPU only) against ``jax.nn.dot_product_attention``'s XLA
path, over every form of mask the objectives use (none, packed segments with padding, causal packed
segments, keys hidden from every query), aligned and unaligned lengths, values and gradients; sharded
over a mesh; and whole train steps with the kernel equal to the same steps with XLA attention.

Packed kernels go wrong silently (a segment that leaks into its neighbour still trains), so each case
compares every output row and every gradient, padding rows included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax import sharding
from maskjax import step as step_lib
from maskjax.models import layers
from tests.conftest import load_config

MASKS = ("none", "packed", "causal", "keys")
LENGTHS = (50, 128, 197, 300)  # shorter than a block, one block, ViT-B's 197, three blocks after padding


def segments_for(kind: str, batch: int, length: int, seed: int = 0) -> layers.Segments | None:
    """The objectives' masks on random rows: packed documents with trailing padding (segment 0, as the
    text loader packs them; one row without padding), the same causal, or MAE dual masking's hidden keys."""
    if kind == "none":
        return None
    rng = np.random.default_rng([seed, length])
    if kind == "keys":
        valid = rng.random((batch, length)) < 0.7
        valid[:, 0] = True
        return layers.Segments.keys(jnp.asarray(valid), length)
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        end = length if row == 0 else length - int(rng.integers(1, max(2, length // 4)))
        cuts = np.sort(rng.choice(np.arange(1, end), size=min(3, end - 1), replace=False))
        ids[row, :end] = 1 + np.searchsorted(cuts, np.arange(end), side="right")
    return layers.Segments.packed(jnp.asarray(ids), causal=kind == "causal")


def reference(q, k, v, segments):
    """jax.nn.dot_product_attention (XLA) on heads-major operands."""
    t = lambda a: a.transpose(0, 2, 1, 3)
    mask = None if segments is None else segments.dense()
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask, implementation="xla"))


def kernel(implementation: str):
    if implementation == "splash_interpret":
        return lambda q, k, v, s: layers.splash_attention(q, k, v, s, interpret=True)
    t = lambda a: a.transpose(0, 2, 1, 3)
    return lambda q, k, v, s: t(jax.nn.dot_product_attention(
        t(q), t(k), t(v), mask=None if s is None else s.dense(), implementation="cudnn"))


def operands(batch, heads, length, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(keys[i], (batch, heads, length, head_dim)).astype(dtype) for i in range(3))
    weights = jax.random.normal(keys[3], (batch, heads, length, head_dim))
    return q, k, v, weights


def check_against_reference(implementation, mask, length, dtype=jnp.float32, heads=2, head_dim=32):
    if implementation == "cudnn":
        why = layers.cudnn_unsupported(dtype, head_dim, length, mask != "none")
        if why:
            pytest.skip(f"cuDNN flash attention {why}")
    segments = segments_for(mask, 2, length)
    q, k, v, weights = operands(2, heads, length, head_dim, dtype)
    run = kernel(implementation)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, segments).astype(jnp.float32)) * weights)
    out, ref = jax.jit(run)(q, k, v, segments), jax.jit(reference)(q, k, v, segments)
    grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    f32 = lambda a: np.asarray(a, np.float32)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(f32(out), f32(ref), atol=tol, rtol=tol, err_msg=f"{implementation} {mask} {length}")
    for name, g, r in zip("qkv", grads, ref_grads):
        scale = float(np.abs(f32(r)).max())
        np.testing.assert_allclose(f32(g), f32(r), atol=tol * max(scale, 1.0), rtol=tol,
                                   err_msg=f"d{name}: {implementation} {mask} {length}")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mask", MASKS)
def test_splash_attention_matches_xla(mask, length):
    check_against_reference("splash_interpret", mask, length)


@pytest.mark.parametrize("mask,length,dtype,head_dim", [
    ("packed", 512, jnp.float32, 64),   # one 512-token block
    ("causal", 256, jnp.bfloat16, 64),  # bfloat16 operands, as on a TPU
    ("none", 197, jnp.bfloat16, 128),   # TPU-native head size
])
def test_splash_attention_matches_xla_in_other_shapes(mask, length, dtype, head_dim):
    check_against_reference("splash_interpret", mask, length, dtype, head_dim=head_dim)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mask", MASKS)
def test_cudnn_attention_matches_xla(mask, length):
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN flash attention needs a CUDA GPU")
    check_against_reference("cudnn", mask, length, jnp.bfloat16, head_dim=64)


def test_a_packed_segment_never_sees_its_neighbour():
    """Changing one document's keys and values changes no other document's output (and padding sees
    only padding), through the kernel itself rather than against a reference."""
    segments = segments_for("packed", 2, 197)
    q, k, v, _ = operands(2, 2, 197, 32, jnp.float32)
    ids = np.asarray(segments.q)
    doc = ids == 2
    k2 = jnp.where(jnp.asarray(doc)[:, None, :, None], k + 3.0, k)
    v2 = jnp.where(jnp.asarray(doc)[:, None, :, None], -v, v)
    run = jax.jit(kernel("splash_interpret"))
    changed = np.abs(np.asarray(run(q, k2, v2, segments) - run(q, k, v, segments))).max(axis=(1, 3))  # [batch, length]
    assert (changed[~doc] == 0).all()
    assert (changed[doc] > 0).all()


def test_splash_attention_sharded_over_batch_and_heads_equals_one_device():
    """Under a data x fsdp x tensor mesh the kernel runs on each device's rows and heads
    (sharding.per_shard) and gives the unsharded values and gradients, its output sharded the same way."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    segments = segments_for("causal", 4, 197)
    q, k, v, weights = operands(4, 4, 197, 32, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(layers.splash_attention(q, k, v, segments, interpret=True) * weights)

    def run(mesh):
        with sharding.activation_mesh(mesh):
            out = jax.jit(lambda q, k, v: layers.splash_attention(q, k, v, segments, interpret=True))(q, k, v)
            return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (out, grads), (alone, alone_grads) = run(mesh), run(None)
    assert tuple(out.sharding.spec)[:2] == (("data", "fsdp"), "tensor")
    np.testing.assert_allclose(np.asarray(out), np.asarray(alone), atol=1e-6)
    for g, a in zip(grads, alone_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("mode,dtype,head_dim,length,masked,platform,expected", [
    ("auto", jnp.bfloat16, 64, 197, False, "tpu", "splash"),
    ("auto", jnp.float32, 64, 197, True, "tpu", "splash"),
    ("splash", jnp.bfloat16, 64, 512, True, "tpu", "splash"),
    ("splash", jnp.bfloat16, 64, 512, True, "cpu", "needs a TPU"),
    ("splash", jnp.bfloat16, 64, 512, True, "gpu", "needs a TPU"),
    ("splash_interpret", jnp.float32, 64, 197, True, "cpu", "splash_interpret"),
])
def test_splash_attention_choice(mode, dtype, head_dim, length, masked, platform, expected):
    if expected.startswith("splash"):
        assert layers.attention_implementation(mode, dtype, head_dim, length, masked, platform) == expected
    else:
        with pytest.raises(ValueError, match=f"attention='splash' {expected}"):
            layers.attention_implementation(mode, dtype, head_dim, length, masked, platform)


def train_step(config, batch: dict | None = None):
    """One train step of ``config`` on an 8-device data x fsdp x tensor mesh: (loss, new parameters)."""
    setup = step_lib.build(config)
    local = batch or setup.objective.synthetic_batch(np.random.default_rng(0))
    state, metrics = setup.step_fn(setup.init_fn(), setup.global_batch(local))
    return float(metrics["loss"]), step_lib.host_params(state["params"])


def packed_text_batch(objective) -> dict:
    """The synthetic text batch re-packed: three documents and trailing padding per row, positions
    restarting at each document (what the text loader produces)."""
    batch = objective.synthetic_batch(np.random.default_rng(0))
    ids = np.asarray(segments_for("packed", *batch["tokens"].shape).q)
    starts = np.concatenate([np.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    positions = np.zeros_like(ids)
    for row in range(ids.shape[0]):
        for i in range(1, ids.shape[1]):
            positions[row, i] = 0 if starts[row, i] else positions[row, i - 1] + 1
    batch["segment_ids"], batch["positions"] = ids, positions
    batch["tokens"] = np.where(ids == 0, 0, batch["tokens"])
    batch["maskable"] = batch["maskable"] & (ids > 0)
    return batch


MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


@pytest.mark.parametrize("name,overrides", [
    ("mae_digits.py:tiny", ["model.heads=4", "decoder.heads=4"]),  # 16 patches + cls: one padded block
    ("videomae_digits.py:tiny,dual", ["mask.decoder_ratio=0.5"]),   # decoder keys hidden from every query
])
def test_a_vision_train_step_with_splash_equals_xla(name, overrides):
    runs = {mode: train_step(load_config(name, *MESH, *overrides, f"model.attention={mode}"))
            for mode in ("xla", "splash_interpret")}
    (loss, params), (splash_loss, splash_params) = runs["xla"], runs["splash_interpret"]
    assert splash_loss == pytest.approx(loss, rel=1e-5)
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        b = splash_params
        for key in path:
            b = b[key.key]
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["mlm_text.py:tiny", "ar_text.py:tiny"])
def test_a_packed_text_train_step_with_splash_equals_xla(name, data_dir):
    """BERT-style MLM (bidirectional in each packed document) and the causal baseline."""
    from maskjax import objectives

    batch = packed_text_batch(objectives.get(load_config(name, *MESH, data_dir=data_dir)))
    runs = {mode: train_step(load_config(name, *MESH, f"model.attention={mode}", data_dir=data_dir), batch)
            for mode in ("xla", "splash_interpret")}
    (loss, params), (splash_loss, splash_params) = runs["xla"], runs["splash_interpret"]
    assert splash_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(splash_params)):
        np.testing.assert_allclose(b, a, atol=1e-6)
