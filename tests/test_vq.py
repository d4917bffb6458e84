"""The VQ tokenizer: nearest-code assignment against brute force, the straight-through estimator and
which parameters each loss term reaches, codebook statistics against NumPy, the tokenizer round trip,
and a short training run with its evaluation (probes and the reconstruction PNG)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import objectives
from maskjax.objectives import vq
from tests.conftest import load_config


def test_nearest_codes_is_brute_force_argmin():
    rng = np.random.default_rng(0)
    z, codebook = rng.normal(size=(3, 10, 6)).astype(np.float32), rng.normal(size=(17, 6)).astype(np.float32)
    want = np.argmin(((z[:, :, None, :] - codebook[None, None]) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(np.asarray(vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))), want)


def test_code_statistics_match_numpy():
    indices = np.array([[0, 0, 1, 3], [3, 3, 3, 0]])
    perplexity, usage = vq.code_statistics(jnp.asarray(indices), 8)
    freq = np.bincount(indices.ravel(), minlength=8) / indices.size
    nz = freq[freq > 0]
    assert float(perplexity) == pytest.approx(np.exp(-(nz * np.log(nz)).sum()), rel=1e-6)
    assert float(usage) == pytest.approx(3 / 8)


def model_and_batch(l2_norm: bool = False):
    config = load_config("vq_digits.py:tiny", f"vq.l2_norm={l2_norm}")
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(0))
    batch = {"image": jax.random.normal(jax.random.key(1), (4, 16, 16, 1)), "label": jnp.zeros(4, jnp.int32)}
    return objective, model, batch


@pytest.mark.parametrize("l2_norm", [False, True])
def test_each_loss_term_reaches_only_its_side(l2_norm):
    """Reconstruction: encoder (straight through) and decoder, never the codebook; codebook loss: only
    the codebook; commitment: only the encoder (also with L2-normalised look-up)."""
    objective, model, batch = model_and_batch(l2_norm)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    def term(name):
        def f(p):
            return objective.loss(nnx.merge(graphdef, p), batch, jax.random.key(0), 0)[1][name]
        return jax.grad(f)(params)

    norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
    recon, book, commit = term("reconstruction_loss"), term("codebook_loss"), term("commitment_loss")
    assert norm(recon["codebook"]) == 0 and norm(recon["encoder"]) > 0 and norm(recon["blocks"]) > 0
    assert norm(book["codebook"]) > 0 and norm(book["encoder"]) == 0 and norm(book["blocks"]) == 0
    assert norm(commit["codebook"]) == 0 and norm(commit["encoder"]) > 0 and norm(commit["blocks"]) == 0


def test_straight_through_passes_the_decoders_gradient_to_the_encoder_unchanged():
    objective, model, batch = model_and_batch()
    z = model.encode(objective.patches(batch))
    e = jnp.take(model.codebook[...], vq.nearest_codes(z, model.codebook[...]), axis=0)
    graphdef, state = nnx.split(model)
    state = nnx.to_pure_dict(state)  # plain arrays: the module is rebuilt inside each trace
    f = lambda q: jnp.sum(jnp.sin(nnx.merge(graphdef, state).decode(q)))
    through = jax.grad(lambda z: f(z + jax.lax.stop_gradient(e - z)))(z)
    np.testing.assert_allclose(through, jax.grad(f)(e), atol=1e-6)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_tokenizer_round_trip_is_the_forward_reconstruction(l2_norm):
    objective, model, batch = model_and_batch(l2_norm)
    tokens = objective.tokens(model, batch)
    assert tokens.shape == (4, objective.num_tokens) and tokens.dtype == jnp.int32
    z, codebook = objective._vectors(model, objective.patches(batch))
    if l2_norm:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(codebook), axis=-1), 1.0, rtol=1e-5)
        cosine = np.einsum("bld,kd->blk", np.asarray(z), np.asarray(codebook))
        np.testing.assert_array_equal(np.asarray(tokens), cosine.argmax(-1))  # nearest = most similar
    e = jnp.take(codebook, tokens, axis=0)
    np.testing.assert_allclose(objective.detokenize(model, tokens), model.decode(z + jax.lax.stop_gradient(e - z)),
                               atol=1e-6)
    images = objective.reconstruct(model, batch, jax.random.key(0))
    assert list(images) == ["input", "reconstruction"] and images["reconstruction"].shape == batch["image"].shape


def test_a_short_run_trains_and_evaluates(data_dir, tmp_path):
    from maskjax import train

    config = load_config("vq_digits.py:tiny", "total_steps=20", "log_every=1", "checkpoint.every=20",
                         data_dir=data_dir)
    summary = train.train(config, str(tmp_path), quiet=True)
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < losses[0]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert {"pretrained", "random_init", "raw_pixels"} <= set(results)
    assert os.path.isfile(results["reconstruction_png"])


def ema_setup(*overrides):
    from maskjax import step as step_lib

    config = load_config("vq_digits.py:tiny", "vq.ema=True", "mesh.data=8", "optim.base_lr=0.01", *overrides)
    setup = step_lib.build(config)
    batch = setup.global_batch(setup.objective.synthetic_batch(np.random.default_rng(0)))
    return setup, setup.init_fn(), batch


def assigned_vectors(setup, params, batch):
    """(encoder outputs z [N, d] as the look-up compares them, their codes [N]) under ``params``."""
    objective = setup.objective
    model = nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, params))
    z, codebook = objective._vectors(model, objective.patches(batch))
    codes = vq.nearest_codes(z, codebook)
    return np.asarray(z, np.float64).reshape(-1, z.shape[-1]), np.asarray(codes).reshape(-1)


def test_ema_codebook_follows_the_vq_vae_moving_averages():
    """``vq.ema``: after each applied step N <- d N + (1 - d) n and m <- d m + (1 - d) sum of the batch's
    vectors assigned to each code (computed with the parameters before the step), and each code is
    m / ((N + eps) / (sum N + K eps) sum N): a float64 NumPy loop over 3 steps. The codebook gets no
    gradient, so Adam's moments for it stay zero and `maskjax params` lists it as not trained."""
    from maskjax import params as params_lib

    setup, state, batch = ema_setup()
    q = setup.config.vq
    host = lambda x: jax.tree.map(np.asarray, jax.device_get(x))
    before = host(state["params"])
    counts, sums = before["code_counts"].astype(np.float64), before["code_sums"].astype(np.float64)
    np.testing.assert_array_equal(before["code_sums"], before["codebook"])
    for _ in range(3):
        z, codes = assigned_vectors(setup, host(state["params"]), batch)
        n = np.bincount(codes, minlength=q.codebook_size)
        m = np.zeros_like(sums)
        np.add.at(m, codes, z)
        counts = q.ema_decay * counts + (1 - q.ema_decay) * n
        sums = q.ema_decay * sums + (1 - q.ema_decay) * m
        state, metrics = setup.step_fn(state, batch)
        after = host(state["params"])
        smoothed = (counts + q.ema_eps) / (counts.sum() + q.codebook_size * q.ema_eps) * counts.sum()
        np.testing.assert_allclose(after["code_counts"], counts, rtol=1e-5)
        np.testing.assert_allclose(after["code_sums"], sums, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(after["codebook"], sums / smoothed[:, None], rtol=1e-4, atol=1e-6)
    assert "_stats" not in metrics and np.isfinite(float(metrics["loss"]))
    adam = [s for s in jax.tree.leaves(host(state["opt_state"]), is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    assert not np.any(adam.mu["codebook"]) and not np.any(adam.nu["code_sums"])
    assert np.any(adam.mu["to_code"]["kernel"])
    rows = {r["path"]: r for r in params_lib.table(setup)["rows"]}
    assert not rows["codebook"]["trainable"] and not rows["code_sums"]["trainable"]
    assert rows["to_code/kernel"]["trainable"]


def test_dead_codes_restart_at_batch_vectors():
    """A code whose EMA count falls below ``vq.dead_threshold`` becomes one of the batch's encoder
    outputs (counted once); with a threshold no code reaches, every code restarts each step."""
    setup, state, batch = ema_setup("vq.dead_threshold=1e9")
    host = lambda x: jax.tree.map(np.asarray, jax.device_get(x))
    z, _ = assigned_vectors(setup, host(state["params"]), batch)
    state, _ = setup.step_fn(state, batch)
    after = host(state["params"])
    distance = ((after["codebook"][:, None, :] - z[None]) ** 2).sum(-1).min(-1)
    assert distance.max() < 1e-10
    np.testing.assert_array_equal(after["code_counts"], 1.0)
    assert len({tuple(row) for row in after["codebook"].round(6)}) > 1  # random picks, not one vector


def test_ema_options_are_checked():
    from maskjax.config import ConfigError

    for overrides, key in [(["vq.dead_threshold=1.0"], "vq.dead_threshold"),
                           (["vq.ema=True", "vq.ema_decay=1.0"], "vq.ema_decay"),
                           (["vq.ema=True", "vq.dead_threshold=1.0", "optim.grad_accum=2"], "vq.dead_threshold")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            objectives.get(load_config("vq_digits.py:tiny", *overrides)).validate()
