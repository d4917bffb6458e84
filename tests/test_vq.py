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
