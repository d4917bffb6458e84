"""Masked generative image models (MaskGIT, MAGE) over a frozen VQ tokenizer: the mask schedules and
per-step reveal counts against the official formulas (google-research/maskgit ``mask_schedule.py``,
``parallel_decode.py``; LTH14/mage ``models_mage.py``), the training masks' distributions against the
analytic ones, the losses against PyTorch's label-smoothed cross-entropy on the hidden positions, the
sampler's invariants, the Fréchet distance against scipy, and the frozen tokenizer loaded from a
finished VQ run, kept through training and resume, and used by evaluation and ``maskjax sample``."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import masking, objectives, quality
from maskjax import step as step_lib
from maskjax.objectives import maskgit as maskgit_lib
from tests.conftest import load_config


def parts(name: str, *overrides: str):
    """(objective, student model, frozen random tokenizer, a batch of 4 random images)."""
    objective = objectives.get(load_config(name, *overrides))
    model = objective.build(nnx.Rngs(0))
    teacher = objective.tokenizer.build(nnx.Rngs(1))
    batch = {"image": jax.random.normal(jax.random.key(2), (4, 16, 16, 1)), "label": jnp.arange(4, dtype=jnp.int32)}
    return objective, model, teacher, batch


# --------------------------------------------------------------------------- schedules and masks


def test_schedules_are_the_official_functions():
    r = np.linspace(0.0, 1.0, 11)
    want = {"cosine": np.cos(np.pi / 2 * r), "linear": 1 - r, "square": 1 - r**2, "sqrt": 1 - np.sqrt(r)}
    for kind, values in want.items():
        np.testing.assert_allclose(masking.generative_schedule(kind, r), np.clip(values, 1e-6, 1.0), atol=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        masking.generative_schedule("exp", r)


def official_hidden_counts(unknown: int, steps: int) -> list[int]:
    """The tokens left hidden after each step by google-research/maskgit's ``decode``, re-derived:
    mask_len = floor(N0 * clip(cos(pi/2 (t+1)/T), 1e-6, 1)), clipped to [1, hidden - 1]; the last
    step's output is the draw itself (nothing hidden)."""
    hidden, out = unknown, []
    for t in range(steps):
        mask_len = math.floor(unknown * max(math.cos(math.pi / 2 * (t + 1) / steps), 1e-6))
        hidden = 0 if t == steps - 1 else max(1, min(hidden - 1, mask_len))
        out.append(hidden)
    return out


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_sampler_reveals_per_the_schedule_and_never_changes_a_revealed_token(steps):
    objective, model, teacher, _ = parts("maskgit_digits.py:tiny")
    length = objective.num_tokens
    assert masking.reveal_counts(length, steps) == official_hidden_counts(length, steps)
    final, hidden, draws = jax.jit(lambda m, k: objective.sample(m, k, 6, steps, jnp.arange(6) % 10, trace=True))(
        model, jax.random.key(steps))
    final, hidden, draws = np.asarray(final), np.asarray(hidden), np.asarray(draws)
    assert hidden.shape == (steps, 6, length)
    for t in range(steps):
        assert (hidden[t].sum(-1) == official_hidden_counts(length, steps)[t]).all(), t
    assert not (final == objective.mask_id).any() and final.max() < objective.codebook_size
    np.testing.assert_array_equal(final, draws[-1])
    for t in range(steps):
        shown = ~hidden[t]
        for later in range(t + 1, steps):
            np.testing.assert_array_equal(draws[later][shown], draws[t][shown])
        np.testing.assert_array_equal(final[shown], draws[t][shown])
    # a hidden set only shrinks
    for t in range(1, steps):
        assert not (hidden[t] & ~hidden[t - 1]).any()


def test_the_choice_keeps_the_most_confident_draws_without_noise():
    """Choice temperature 0: the positions hidden again after a step are exactly those whose draw has
    the lowest log-probability (official ``mask_by_random_topk`` with no Gumbel term), computed here
    in float64 from the logits and the step's draws; the count follows the schedule."""
    objective, model, _, _ = parts("maskgit_digits.py:tiny")
    k, length, n = objective.codebook_size, objective.num_tokens, 3
    logits = np.random.default_rng(0).normal(size=(n, length, k)).astype(np.float32) * 3
    start = jnp.full((n, length), objective.mask_id, jnp.int32)
    _, hidden, draws = maskgit_lib.parallel_decode(lambda m, z: jnp.asarray(logits), model, start, objective.mask_id,
                                                   4, jax.random.key(0), choice_temperature=0.0, trace=True)
    hidden, draws = np.asarray(hidden), np.asarray(draws)
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    chosen = np.take_along_axis(logp, draws[0][..., None], -1)[..., 0]
    count = official_hidden_counts(length, 4)[0]
    for row in range(n):
        np.testing.assert_array_equal(np.flatnonzero(hidden[0][row]), np.sort(np.argsort(chosen[row])[:count]))


def test_training_masks_follow_ceil_gamma_r_and_the_label_drop():
    """Hidden counts: ceil(cos(pi/2 r) L) with r ~ U(0, 1), so P(count <= k) = 1 - (2/pi) arccos(k/L);
    the empirical CDF of 4,096 rows is within the 1% Kolmogorov-Smirnov bound of it. About 10% of the
    class tokens become the null class, the rest are label + codebook + 1."""
    objective, _, _, _ = parts("maskgit_digits.py:tiny")
    rows, length = 4096, objective.num_tokens
    batch = {"image": jnp.zeros((rows, 16, 16, 1)), "label": jnp.arange(rows, dtype=jnp.int32) % 10}
    hidden, classes = jax.jit(objective.draw)(jax.random.key(0), batch)
    counts = np.asarray(hidden).sum(-1)
    assert counts.min() >= 1 and counts.max() <= length
    ks = np.arange(length + 1)
    analytic = 1 - 2 / np.pi * np.arccos(ks / length)
    empirical = np.array([(counts <= k).mean() for k in ks])
    assert np.abs(empirical - analytic).max() < 1.63 / np.sqrt(rows)
    classes, labels = np.asarray(classes), np.asarray(batch["label"])
    null = objective.codebook_size + 1 + 10
    dropped = classes == null
    assert abs(dropped.mean() - 0.1) < 3 * np.sqrt(0.1 * 0.9 / rows)
    np.testing.assert_array_equal(classes[~dropped], labels[~dropped] + objective.codebook_size + 1)


def test_mage_masks_drop_half_and_mask_a_truncated_normal_share():
    """MAGE: exactly ceil(0.5 L) tokens dropped, all of them masked; masked count ceil(r L) with r from
    scipy's truncnorm(0.5, 1, 0.55, 0.25) (KS bound on 4,096 rows); kept and restore indices agree."""
    from scipy import stats

    objective, _, _, _ = parts("mage_digits.py:tiny")
    rows, length = 4096, objective.num_tokens
    batch = {"image": jnp.zeros((rows, 16, 16, 1)), "label": jnp.zeros(rows, jnp.int32)}
    dropped, masked = jax.jit(objective.draw)(jax.random.key(0), batch)
    drop, masked = np.asarray(dropped.mask), np.asarray(masked)
    assert (drop.sum(-1) == math.ceil(length * 0.5)).all() and not (drop & ~masked).any()
    keep = np.asarray(dropped.keep_idx)
    assert keep.shape == (rows, length - math.ceil(length * 0.5)) and not np.take_along_axis(drop, keep, 1).any()
    counts = masked.sum(-1)
    ratio = stats.truncnorm((0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25, loc=0.55, scale=0.25)
    ks = np.arange(math.ceil(length * 0.5), length + 1)
    empirical = np.array([(counts <= k).mean() for k in ks])
    assert np.abs(empirical - ratio.cdf(ks / length)).max() < 1.63 / np.sqrt(rows)


# --------------------------------------------------------------------------- losses against PyTorch


def torch_smoothed_ce(logits: np.ndarray, labels: np.ndarray, smoothing: float) -> float:
    import torch
    import torch.nn.functional as F

    return float(F.cross_entropy(torch.from_numpy(np.asarray(logits, np.float64)), torch.from_numpy(labels).long(),
                                 label_smoothing=smoothing))


def test_maskgit_loss_is_torchs_label_smoothed_cross_entropy_on_hidden_positions():
    objective, model, teacher, batch = parts("maskgit_digits.py:tiny")
    key = jax.random.key(3)
    loss, metrics = objective.loss(model, batch, key, 0, teacher)
    tokens = np.asarray(objective.tokenize(teacher, batch))
    hidden, classes = objective.draw(key, batch)
    hidden = np.asarray(hidden)
    logits = np.asarray(objective.logits(model, jnp.where(hidden, objective.mask_id, tokens), classes))
    assert logits.shape == (4, objective.num_tokens, objective.codebook_size)
    want = torch_smoothed_ce(logits[hidden], tokens[hidden], 0.1)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(metrics["mask_ratio"]) == pytest.approx(hidden.mean())
    # the visible tokens are inputs, never targets: other logits there leave the loss unchanged
    assert 0 < hidden.sum() < hidden.size


def test_mage_loss_is_torchs_label_smoothed_cross_entropy_on_masked_positions_and_drops_reach_nothing():
    objective, model, teacher, batch = parts("mage_digits.py:tiny")
    key = jax.random.key(4)
    loss, _ = objective.loss(model, batch, key, 0, teacher)
    tokens = np.asarray(objective.tokenize(teacher, batch))
    dropped, masked = objective.draw(key, batch)
    masked = np.asarray(masked)
    inputs = jnp.where(masked, objective.mask_id, tokens)
    logits = np.asarray(objective.logits(model, inputs, dropped, masked))
    assert float(loss) == pytest.approx(torch_smoothed_ce(logits[masked], tokens[masked], 0.1), rel=1e-5)
    # a dropped position's token never reaches the encoder (nor the decoder: the mask token stands there)
    changed = jnp.where(np.asarray(dropped.mask), (tokens + 1) % objective.codebook_size, inputs)
    np.testing.assert_allclose(np.asarray(objective.logits(model, changed, dropped, masked)), logits, atol=1e-6)
    # a kept [MASK] token does reach it (it is an encoder input)
    kept_masked = masked & ~np.asarray(dropped.mask)
    if kept_masked.any():
        other = jnp.where(kept_masked, 0, inputs)
        assert np.abs(np.asarray(objective.logits(model, other, dropped, masked)) - logits).max() > 1e-4


def test_guidance_mixes_conditional_and_null_class_logits():
    """guidance g: logits = cond + g (cond - uncond), the null class standing for 'no class'."""
    objective, model, _, _ = parts("maskgit_digits.py:tiny")
    z = jnp.full((2, objective.num_tokens), objective.mask_id, jnp.int32)
    cond = objective.logits(model, z, objective.class_ids(jnp.array([3, 7]), 2))
    uncond = objective.logits(model, z, objective.class_ids(None, 2))
    assert np.abs(np.asarray(cond - uncond)).max() > 1e-4
    seen = {}

    def spy(m, k, n, steps, labels, temperature, guidance):
        original = maskgit_lib.parallel_decode

        def capture(logits_fn, model, tokens, *a, **kw):
            seen["logits"] = logits_fn(model, tokens)
            return tokens
        maskgit_lib.parallel_decode = capture
        try:
            objective.sample(m, k, n, steps, labels, temperature, guidance)
        finally:
            maskgit_lib.parallel_decode = original

    spy(model, jax.random.key(0), 2, 1, jnp.array([3, 7]), None, 2.0)
    np.testing.assert_allclose(seen["logits"], cond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the quality metric


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) * 1.5 + 0.3
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = mu @ mu + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert quality.frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert quality.frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-8)  # a shift c: |c|^2


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tokenizer_run(data_dir, tmp_path_factory):
    """A short VQ run: the frozen tokenizer of the runs below."""
    from maskjax import train

    workdir = str(tmp_path_factory.mktemp("vq"))
    config = load_config("vq_digits.py:tiny", "total_steps=4", "checkpoint.every=2", "eval.probe=False",
                         data_dir=data_dir)
    train.train(config, workdir, evaluate=False, quiet=True)
    return workdir


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("name", ["maskgit_digits.py:tiny", "mage_digits.py:tiny"])
def test_the_tokenizer_is_the_vq_runs_and_stays_frozen(data_dir, tokenizer_run, name):
    """The teacher in the state is the VQ run's whole parameter tree at its newest checkpoint, bit for bit;
    training steps leave it untouched; the tokens are that run's VQ objective applied directly."""
    group = name.split("_")[0]
    config = load_config(name, f"{group}.tokenizer={tokenizer_run}", data_dir=data_dir)
    setup = step_lib.build(config)
    state = setup.init_fn()
    saved, step = step_lib.saved_params(tokenizer_run)
    assert step == 4
    before = host(state["teacher"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    batch = setup.global_batch(setup.objective.synthetic_batch(np.random.default_rng(0)))
    first = host(state["params"])
    for _ in range(2):
        state, metrics = setup.step_fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(host(state["teacher"])), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(host(state["params"])), jax.tree.leaves(first)))
    source = objectives.saved_config(tokenizer_run, "maskgit.tokenizer")
    vq_objective = objectives.get(source)
    vq_model = vq_objective.build(nnx.Rngs(9))
    nnx.update(vq_model, nnx.State(jax.tree.map(jnp.asarray, saved)))
    images = {"image": jax.random.normal(jax.random.key(0), (4, 16, 16, 1))}
    teacher = nnx.merge(setup.teacher_graphdef, jax.tree.map(jnp.asarray, before))
    np.testing.assert_array_equal(np.asarray(setup.objective.tokenize(teacher, images)),
                                  np.asarray(vq_objective.tokens(vq_model, images)))
    round_trip = setup.objective.round_trip(None, images, teacher=teacher)
    direct = vq_objective.reconstruct(vq_model, images, jax.random.key(0))["reconstruction"]
    np.testing.assert_allclose(np.asarray(round_trip), np.asarray(direct), atol=1e-5)


def test_bad_tokenizers_are_named(data_dir, tmp_path, tokenizer_run):
    from maskjax.config import ConfigError

    with pytest.raises(ConfigError, match="maskgit.tokenizer.*no config.json"):
        step_lib.validate(load_config("maskgit_digits.py", f"maskgit.tokenizer={tmp_path}/none", data_dir=data_dir))
    with pytest.raises(ConfigError, match="maskgit.tokenizer.*no tokenizer"):
        step_lib.validate(load_config("maskgit_digits.py:tiny", "maskgit.tokenizer_config=", data_dir=data_dir))
    with pytest.raises(ConfigError, match="maskgit.tokenizer.*data.image_size"):
        step_lib.validate(load_config("maskgit_digits.py", f"maskgit.tokenizer={tokenizer_run}",
                                      "data.image_size=32", data_dir=data_dir))
    mae = tmp_path / "mae"
    mae.mkdir()
    (mae / "config.json").write_text(json.dumps({"objective": "mae"}))
    with pytest.raises(ConfigError, match="'mae' run, not 'vq'"):
        step_lib.validate(load_config("mage_digits.py", f"mage.tokenizer={mae}", data_dir=data_dir))
    with pytest.raises(ConfigError, match="eval.finetune_epochs"):
        step_lib.validate(load_config("mage_digits.py:tiny", "eval.finetune_epochs=1", data_dir=data_dir))


@pytest.mark.slow
def test_train_resume_evaluate_and_sample(data_dir, tmp_path, tokenizer_run, capsys):
    """MaskGIT with the VQ run's tokenizer: stopping at step 4 and resuming gives the uninterrupted run's
    losses and state (teacher included) bit for bit; eval.json scores the samples beside real images,
    the tokenizer's reconstructions and random tokens; ``maskjax sample`` writes a grid and a trace."""
    from maskjax import checkpoint, cli, metrics, train

    overrides = (f"maskgit.tokenizer={tokenizer_run}", "log_every=1", "checkpoint.every=2")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train(load_config("maskgit_digits.py:tiny", *overrides, data_dir=data_dir), straight, quiet=True)
    train.train(load_config("maskgit_digits.py:tiny", *overrides, data_dir=data_dir), resumed, stop_at=4,
                evaluate=False, quiet=True)
    train.train(load_config("maskgit_digits.py:tiny", *overrides, data_dir=data_dir), resumed, quiet=True)
    history = lambda w: [(r["step"], r["loss"]) for r in metrics.read_jsonl(os.path.join(w, "metrics.jsonl"))
                         if "loss" in r]
    assert history(resumed) == history(straight) and len(history(straight)) == 8
    setup = step_lib.build(load_config("maskgit_digits.py:tiny", *overrides, data_dir=data_dir))
    states = []
    for workdir in (straight, resumed):
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        states.append(host(ckpt.restore_state(8, setup.abstract_state)))
        ckpt.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)
    gen = json.loads(open(os.path.join(straight, "eval.json")).read())["generation"]
    for group in ("samples", "real_train_images", "tokenizer_reconstructions", "random_tokens"):
        assert np.isfinite(gen[group]["frechet_distance"]) and gen[group]["num"] == 40, group
    assert gen["real_train_images"]["frechet_distance"] < gen["random_tokens"]["frechet_distance"]
    assert gen["classifier_test_accuracy"] > 0.9 and 0 <= gen["samples"]["class_accuracy"] <= 1
    assert os.path.exists(gen["png"])

    out = tmp_path / "grid.png"
    code = cli.main(["sample", "--workdir", straight, "--num", "20", "--steps", "3", "--trace", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    from PIL import Image

    grid, trace = Image.open(out), Image.open(tmp_path / "grid_trace.png")
    assert grid.size[0] > grid.size[1] and trace.size[1] > grid.size[1]  # 2 rows of 10 / 3 rows of 16
    assert "3 decoding steps" in text
    one_class = tmp_path / "three.png"
    assert cli.main(["sample", "--workdir", straight, "--num", "13", "--class", "3", "--out", str(one_class)]) == 0
    assert Image.open(one_class).size == grid.size  # rows of 10, the last one padded
    assert not (tmp_path / "three_trace.png").exists()
    assert cli.main(["sample", "--workdir", straight, "--class", "10"]) == 2
    assert "--class 10 is not a class of this run (0..9)" in capsys.readouterr().err


@pytest.mark.slow
def test_mage_trains_evaluates_with_probes_and_samples(data_dir, tmp_path, tokenizer_run):
    """MAGE's encoder is probed through the probe evaluator (with the frozen tokenizer) beside random
    init and raw pixels, and its unconditional samples are scored."""
    from maskjax import train

    workdir = str(tmp_path / "mage")
    train.train(load_config("mage_digits.py:tiny", f"mage.tokenizer={tokenizer_run}", data_dir=data_dir), workdir,
                quiet=True)
    results = json.loads(open(os.path.join(workdir, "eval.json")).read())
    for group in ("pretrained", "random_init", "raw_pixels"):
        assert 0 < results[group]["linear_probe"] <= 1, group
    assert "class_accuracy" not in results["generation"]["samples"]  # unconditional
