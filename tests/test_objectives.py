"""MAE and SimMIM: loss semantics (golden properties), targets, FLOPs, and that training reduces the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import step as step_lib
from maskjax import masking, objectives
from maskjax.objectives import base, mae, vision
from tests.conftest import load_config


def test_masked_mse_ignores_visible_patches():
    key = jax.random.key(0)
    pred = jax.random.normal(key, (2, 16, 12))
    target = jax.random.normal(jax.random.key(1), (2, 16, 12))
    hidden = jnp.arange(16)[None].repeat(2, 0) % 4 == 0
    base = mae.masked_mse(pred, target, hidden)
    visible_changed = jnp.where(hidden[..., None], target, target + 100.0)
    assert float(mae.masked_mse(pred, visible_changed, hidden)) == pytest.approx(float(base), rel=1e-6)
    hidden_changed = jnp.where(hidden[..., None], target + 1.0, target)
    assert float(mae.masked_mse(pred, hidden_changed, hidden)) != pytest.approx(float(base), rel=1e-3)
    grad = jax.grad(lambda p: mae.masked_mse(p, target, hidden))(pred)
    assert float(jnp.abs(grad[~hidden]).max()) == 0.0
    expected = np.mean(((np.asarray(pred) - np.asarray(target)) ** 2).mean(-1)[np.asarray(hidden)])
    assert float(base) == pytest.approx(expected, rel=1e-5)


def test_mae_loss_is_the_masked_mse_of_the_drawn_mask():
    """End to end through ``objective.loss``: its value is the MSE on exactly the hidden patches of the
    mask its key draws, against norm-pix targets; flipping the targets of visible patches would not
    change it, flipping hidden ones would."""
    config = load_config("mae_digits.py:tiny")
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(0))
    key = jax.random.key(3)
    batch = {"image": jax.random.normal(jax.random.key(4), (4, 16, 16, 1)), "label": jnp.zeros(4, jnp.int32)}
    loss, metrics = objective.loss(model, batch, key, 0)
    patches = objective.patches(batch)
    mask = objective.masks.draw(model, patches, masking.split_rows(base.example_keys(key, batch))[0], 0)
    _, pred = objective.decode(model, patches, mask)
    target = vision.norm_pix(patches)
    assert float(loss) == pytest.approx(float(mae.masked_mse(pred, target, mask.mask)), rel=1e-6)
    assert float(metrics["mask_ratio"]) == pytest.approx(0.75)
    visible_flipped = jnp.where(mask.mask[..., None], target, -target)
    hidden_flipped = jnp.where(mask.mask[..., None], -target, target)
    assert float(mae.masked_mse(pred, visible_flipped, mask.mask)) == pytest.approx(float(loss), rel=1e-6)
    assert float(mae.masked_mse(pred, hidden_flipped, mask.mask)) != pytest.approx(float(loss), rel=1e-3)


def test_norm_pix_targets_are_standardised_with_the_unbiased_variance():
    """MAE and VideoMAE divide by torch's default (unbiased, ddof=1) standard deviation."""
    patches = jax.random.uniform(jax.random.key(0), (3, 10, 48)) * 5 + 2
    t = np.asarray(vision.norm_pix(patches))
    np.testing.assert_allclose(t.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(t.var(-1, ddof=1), 1.0, atol=1e-4)
    # per channel within each patch (VideoMAE): 3 channels, the last axis of each (t, y, x, c) vector
    c = np.asarray(vision.norm_pix(patches, channels=3, mode="channel")).reshape(3, 10, 16, 3)
    np.testing.assert_allclose(c.mean(-2), 0.0, atol=1e-5)
    np.testing.assert_allclose(c.std(-2, ddof=1), 1.0, atol=1e-4)
    back = vision.denorm_pix(vision.norm_pix(patches, 3, "channel"), patches, 3, "channel")
    np.testing.assert_allclose(np.asarray(back), np.asarray(patches), rtol=1e-5)


def test_simmim_l1_only_on_hidden_pixels():
    config = load_config("simmim_digits.py:tiny")
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(0))
    batch = {"image": jax.random.normal(jax.random.key(4), (4, 16, 16, 1)), "label": jnp.zeros(4, jnp.int32)}
    key = jax.random.key(5)
    patches, hidden, pred = objective.predict(model, batch, key)
    loss, metrics = objective.loss(model, batch, key, 0)
    expected = np.abs(np.asarray(pred) - np.asarray(patches))[np.asarray(hidden)].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["mask_ratio"]) == pytest.approx(0.75)  # ceil(4 cells * 0.6) = 3 of 4 cells


@pytest.mark.parametrize("name,overrides", [
    ("mae_digits.py:tiny", []),
    ("simmim_digits.py:tiny", []),
    ("mae_digits.py:tiny", ["data.frames=4", "mask.kind=tube", "mask.ratio=0.5", "model.tubelet=2"]),
])
def test_output_shapes_and_reconstruction(name, overrides):
    config = load_config(name, *overrides)
    objective = objectives.get(config)
    objective.validate()
    model = objective.build(nnx.Rngs(0))
    spec = objective.batch_spec()
    batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
    out = objective.reconstruct(model, batch, jax.random.key(0))
    for name_ in ("input", "masked", "reconstruction"):
        assert out[name_].shape == spec["image"][0]
    assert objective.features(model, batch).shape == (config.batch_size, config.model.width)


def test_mae_flops_counts_encoder_on_kept_tokens_only():
    """Raising the mask ratio shrinks the encoder term; SimMIM (full sequence) costs more than MAE."""
    low = objectives.get(load_config("mae_digits.py", "mask.ratio=0.0")).flops()
    high = objectives.get(load_config("mae_digits.py", "mask.ratio=0.75")).flops()
    assert high < 0.6 * low
    simmim = objectives.get(load_config("simmim_digits.py", "model.width=128", "model.depth=4")).flops()
    assert simmim > high


@pytest.mark.parametrize("name,overrides", [
    ("mae_digits.py:tiny", []),
    ("simmim_digits.py:tiny", []),
    ("mae_digits.py:tiny", ["data.frames=4", "mask.kind=tube", "mask.ratio=0.5"]),
    ("mae_digits.py:tiny", ["mask.kind=block", "mask.ratio=0.5", "mask.min_patches=2"]),
])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(name, overrides):

    config = load_config(name, *overrides, "optim.base_lr=0.01", "optim.warmup_steps=0",
                         "optim.schedule=constant", "total_steps=20")
    setup = step_lib.build(config)
    spec = setup.objective.batch_spec()
    rng = np.random.default_rng(0)
    local = {"image": rng.normal(size=spec["image"][0]).astype(np.float32),
             "label": np.zeros(spec["label"][0], np.int32)}
    batch = setup.global_batch(local)
    state = setup.init_fn()
    losses = []
    for _ in range(15):
        state, m = setup.step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
