"""Teachers in the train state, data2vec 2.0 and frozen-teacher targets: the EMA against a NumPy loop
with fairseq's schedule, the teacher outside the optimizer, targets against torch's instance/layer norms
on the collected block outputs, one teacher pass shared by the masks, the inverse block mask against a
torch re-derivation of fairseq's ``compute_block_mask_2d`` (distributions), the grouped convolution
against XLA's, exact resume after SIGKILL with the teacher, and a frozen teacher loaded from a finished
run equal to running that run's encoder."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import checkpoint, masking, metrics, objectives, params as params_lib
from maskjax import step as step_lib
from maskjax.models import vit
from maskjax.objectives import data2vec
from tests.conftest import ROOT, load_config


def tiny(*overrides):
    return load_config("data2vec_digits.py:tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *overrides)


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def run_steps(config, steps: int):
    """(setup, [host state after step 0..steps]) on one fixed synthetic batch."""
    setup = step_lib.build(config)
    state = setup.init_fn()
    batch = setup.global_batch(setup.objective.synthetic_batch(np.random.default_rng(0)))
    states = [host(state)]
    for _ in range(steps):
        state, _ = setup.step_fn(state, batch)
        states.append(host(state))
    return setup, states


def test_ema_teacher_follows_fairseqs_annealed_decay():
    """teacher_0 = the student's encoder; teacher_k = d_k teacher_{k-1} + (1 - d_k) student_k with
    d_k = end - (end - start)(1 - k / T) (fairseq ``get_annealed_rate`` at num_updates k), in float64 here."""
    start, end, anneal = 0.9, 0.99, 4
    config = tiny(f"data2vec.ema_decay={start}", f"data2vec.ema_end_decay={end}",
                  f"data2vec.ema_anneal_steps={anneal}", "optim.base_lr=0.05")
    _, states = run_steps(config, 6)
    teacher = states[0]["params"]["encoder"]
    for a, b in zip(jax.tree.leaves(states[0]["teacher"]), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, b)
    for k in range(1, 7):
        d = end if k >= anneal else end - (end - start) * (1 - k / anneal)
        teacher = jax.tree.map(lambda t, s: d * t + (1 - d) * s, teacher, states[k]["params"]["encoder"])
        for name, (got, want) in zip(jax.tree_util.tree_flatten_with_path(states[k]["teacher"])[0],
                                     zip(jax.tree.leaves(states[k]["teacher"]), jax.tree.leaves(teacher))):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {k} {name[0]}")
    # the student moved away from the teacher (so the check above is not about equal trees)
    moved = jax.tree.leaves(jax.tree.map(lambda s, t: np.abs(s - t).max(), states[6]["params"]["encoder"],
                                         states[6]["teacher"]))
    assert max(moved) > 1e-3


def test_the_optimizer_never_sees_the_teacher():
    """With decay 1 the teacher stays its initial copy bit for bit while the student trains; the
    optimizer state has moments for the student's parameters only; ``maskjax params`` lists the teacher
    as not trainable and not decayed, beside the trainable student."""
    setup, states = run_steps(tiny("data2vec.ema_decay=1.0", "data2vec.ema_end_decay=1.0"), 3)
    for a, b in zip(jax.tree.leaves(states[3]["teacher"]), jax.tree.leaves(states[0]["teacher"])):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(states[3]["params"]),
                                                          jax.tree.leaves(states[0]["params"])))
    moments = [x for x in jax.tree.leaves(setup.abstract_state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(setup.abstract_state["params"]))
    table = params_lib.table(setup)
    teacher_rows = [r for r in table["rows"] if r["path"].startswith("teacher/")]
    assert len(teacher_rows) == len(jax.tree.leaves(setup.abstract_state["teacher"])) > 0
    assert not any(r["trainable"] or r["weight_decay"] for r in teacher_rows)
    assert table["totals"]["trainable"] == sum(r["size"] for r in table["rows"] if not r["path"].startswith("teacher/"))
    assert table["totals"]["teacher_bytes_per_device"] > 0
    assert "teacher" in params_lib.format_table(table)


def test_collected_block_outputs_are_each_blocks_mlp_output():
    """``collect`` returns, per block, the MLP output before the residual sum (fairseq ``AltBlock`` with
    ``ffn_targets``): checked by running the stacked blocks one at a time by hand (post-norm)."""
    config = tiny()
    encoder = vit.encoder_from_config(config, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 65, config.model.width))
    out, collected = encoder.blocks(x, collect=True)
    graphdef, state = nnx.split(encoder.blocks.blocks)
    h = x
    for i in range(config.model.depth):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        a = block.norm1(h + block.attn(h))
        ffn = block.mlp(a)
        h = block.norm2(a + ffn)
        np.testing.assert_allclose(collected[i], ffn, atol=1e-5)
    np.testing.assert_allclose(out, h, atol=1e-5)


def test_targets_are_the_top_k_normalised_average_as_fairseq_computes_them():
    """``data2vec.targets`` against fairseq's ``make_targets`` written with torch's own instance_norm and
    layer_norm (BTC -> BCT -> instance norm -> BTC per layer, average, layer norm)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    layer_outputs = np.random.default_rng(0).normal(size=(5, 3, 20, 16)).astype(np.float32) * 3 + 1
    for top_k in (1, 3, 5):
        ours = np.asarray(data2vec.targets(jnp.asarray(layer_outputs), top_k))
        layers_ = [torch.from_numpy(t) for t in layer_outputs[-top_k:]]
        layers_ = [F.instance_norm(t.transpose(1, 2).float()).transpose(1, 2) for t in layers_]
        y = sum(layers_) / len(layers_)
        want = F.layer_norm(y, y.shape[-1:]).numpy()
        np.testing.assert_allclose(ours, want, atol=2e-5)


def test_one_teacher_pass_serves_every_mask():
    """The teacher encodes the B images once (not B x M rows); the student gets B x M rows with M
    independent masks per image, each hiding exactly the inverse block count."""
    config = tiny("data2vec.clone_batch=4", "batch_size=8")
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(0))
    teacher = objective.teacher().build(nnx.Rngs(0))
    seen = []
    real_run = vit.ViTEncoder.run

    def run(self, tokens, collect=False):
        seen.append((tokens.shape[0], tokens.shape[1], collect))
        return real_run(self, tokens, collect)

    batch = {k: jnp.asarray(v) for k, v in objective.synthetic_batch(np.random.default_rng(0)).items()}
    try:
        vit.ViTEncoder.run = run
        objective.loss(model, batch, jax.random.key(0), 0, teacher)
    finally:
        vit.ViTEncoder.run = real_run
    assert seen == [(8, 64, True), (32, objective.num_kept, False)]
    keys = objective.clone_keys(jax.random.key(0), batch)
    hidden = np.asarray(objective.draw_mask(masking.split_rows(keys)[0]).mask).reshape(8, 4, 64)
    assert (hidden.sum(-1) == 64 - int(64 * (1 - 0.8))).all()
    for image in hidden:  # four different masks of each image
        assert len({m.tobytes() for m in image}) == 4


def fairseq_inverse_block_masks(torch, draws: int, side: int, mask_prob=0.8, length=3, adjust=0.07):
    """The official ``compute_block_mask_2d`` (default branch, ``inverse_mask``, ``require_same_masks``)
    re-derived with torch's randint and multinomial. Returns [draws, side * side] bool, True = hidden."""
    L = side * side
    prob = 1 - mask_prob
    mask = torch.zeros((draws, side, side))
    centres = torch.randint(0, L, size=(draws, int(L * ((prob + adjust) / length**2))))
    mask.view(draws, -1).scatter_(1, centres, 1)
    b, r, c = mask.nonzero(as_tuple=True)
    offset = length // 2
    rows = torch.cat([(r + i - offset).clamp(0, side - 1) for i in range(length) for _ in range(length)])
    cols = torch.cat([(c + j - offset).clamp(0, side - 1) for _ in range(length) for j in range(length)])
    mask[(b.repeat(length * length), rows, cols)] = 1
    mask = mask.reshape(draws, -1)
    target = int(L * prob)
    for m in mask:
        n = int(m.sum())
        if n > target:
            m[torch.multinomial(m, n - target, replacement=False)] = 0
        elif n < target:
            m[torch.multinomial(1 - m, target - n, replacement=False)] = 1
    return (1 - mask).bool().numpy()


def _neighbours(kept: np.ndarray, side: int) -> float:
    """Mean number of kept 4-neighbours of a kept token (how blocky the visible set is)."""
    grid = kept.reshape(-1, side, side)
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)))
    count = padded[:, :-2, 1:-1].astype(int) + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return float((count * grid).sum() / grid.sum())


@pytest.mark.parametrize("side", [8, 14])
def test_inverse_block_mask_has_fairseqs_distribution(side):
    """Same exact count, the same per-position keep rates (edge squares pile up on the border) and the
    same blockiness as the official algorithm, over 4000 draws each."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    draws = 4000
    theirs = fairseq_inverse_block_masks(torch, draws, side)
    ours = np.asarray(masking.inverse_block_mask(jax.random.key(0), draws, (side, side), 0.8).mask)
    L = side * side
    assert (ours.sum(1) == L - int(L * (1 - 0.8))).all() and (theirs.sum(1) == ours.sum(1)).all()
    rate_ours, rate_theirs = (~ours).mean(0), (~theirs).mean(0)
    se = np.sqrt(rate_theirs * (1 - rate_theirs) / draws) * np.sqrt(2)
    assert np.all(np.abs(rate_ours - rate_theirs) < 5 * se + 1e-3), np.abs(rate_ours - rate_theirs).max()
    assert _neighbours(~ours, side) == pytest.approx(_neighbours(~theirs, side), rel=0.03)
    uniform = np.asarray(masking.random_mask(jax.random.key(0), draws, L, 0.8).mask)
    assert _neighbours(~ours, side) > 1.5 * _neighbours(~uniform, side)  # the statistic can tell them apart


def test_grouped_conv_matches_xlas_grouped_convolution():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 32))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 48))
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                     feature_group_count=16)
    np.testing.assert_allclose(data2vec.grouped_conv(x, kernel, 16), conv(x, kernel), atol=1e-5)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    for a, b in zip(jax.grad(loss(lambda x, k: data2vec.grouped_conv(x, k, 16)), (0, 1))(x, kernel),
                    jax.grad(loss(conv), (0, 1))(x, kernel)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_bad_data2vec_configs_name_the_key():
    from maskjax.config import ConfigError

    for overrides, key in [(["data2vec.top_k=5"], "data2vec.top_k"), (["model.cls_token=False"], "model.cls_token"),
                           (["data2vec.decoder_groups=5"], "data2vec.decoder_groups"),
                           (["data2vec.decoder_kernel=2"], "data2vec.decoder_kernel"),
                           (["mask.block_length=1"], "mask")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            step_lib.validate(tiny(*overrides), num_devices=8)


def _train(data_dir, workdir, fault=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MASKJAX_FAULTS=fault)
    args = [sys.executable, "-m", "maskjax", "train", "--config", "configs/data2vec_digits.py:tiny", "--workdir",
            str(workdir), "--config.log_every=1", "--config.checkpoint.every=2", f"--config.data.data_dir={data_dir}",
            "--config.eval.probe=False"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_sigkill_then_resume_is_bit_identical_with_the_teacher(data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _train(data_dir, straight).returncode == 0
    out = _train(data_dir, killed, fault="kill@step:5")
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    out = _train(data_dir, killed)
    assert out.returncode == 0, out.stderr[-2000:]
    # the async save of step 4 may not have committed when step 5 was killed: step 2 or 4
    assert "resumed from step 4" in out.stderr or "resumed from step 2" in out.stderr
    history = lambda w: [(r["step"], r["loss"], r["teacher_decay"]) for r in
                         metrics.read_jsonl(os.path.join(w, "metrics.jsonl")) if "loss" in r]
    assert history(killed) == history(straight)
    config = load_config("data2vec_digits.py:tiny", data_dir=data_dir)
    setup = step_lib.build(config)
    states = []
    for workdir in (straight, killed):
        ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
        states.append(jax.device_get(ckpt.restore_state(8, setup.abstract_state)))
        ckpt.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(a, b)
    assert set(states[0]) >= {"params", "teacher", "opt_state"}
    assert json.loads((killed / "eval.json").read_text())["step"] == 8


# --------------------------------------------------------------------------- frozen teachers (MILAN / dBOT)


@pytest.fixture(scope="module")
def finished_mae(data_dir, tmp_path_factory):
    """A short MAE run whose encoder becomes the frozen teacher."""
    from maskjax import train

    workdir = str(tmp_path_factory.mktemp("mae_teacher"))
    config = load_config("mae_digits.py:tiny", "total_steps=4", "checkpoint.every=2", data_dir=data_dir)
    train.train(config, workdir, evaluate=False, quiet=True)
    return workdir


def test_a_frozen_teacher_from_a_workdir_gives_that_models_features(data_dir, finished_mae):
    """loss.target=teacher with teacher.workdir: the teacher in the state is that run's encoder at its newest
    checkpoint, bit for bit; its targets are that encoder run directly (through the saved run's own
    objective) and layer-normalised; training leaves it untouched."""
    config = load_config("mae_digits.py:tiny", "loss.target=teacher", f"teacher.workdir={finished_mae}",
                         "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", data_dir=data_dir)
    setup, states = run_steps(config, 2)
    saved, step = step_lib.saved_params(finished_mae, 0, ())
    assert step == 4
    for a, b in zip(jax.tree.leaves(states[0]["teacher"]), jax.tree.leaves(saved["encoder"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(states[2]["teacher"]), jax.tree.leaves(states[0]["teacher"])):
        np.testing.assert_array_equal(a, b)
    source = objectives.saved_config(finished_mae, "teacher")
    model = objectives.get(source).build(nnx.Rngs(5))
    nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, saved)))
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    patches = setup.objective.patches({"image": images})
    direct = np.asarray(model.encoder(patches))[:, 1:]
    direct = (direct - direct.mean(-1, keepdims=True)) / np.sqrt(direct.var(-1, keepdims=True) + 1e-6)
    teacher = nnx.merge(setup.teacher_graphdef, jax.tree.map(jnp.asarray, states[0]["teacher"]))
    np.testing.assert_allclose(setup.objective.teacher_targets(teacher, patches), direct, atol=2e-5)
    assert setup.objective.target_dim == source.model.width


def test_a_random_frozen_teacher_is_not_the_students_initialisation(data_dir):
    """dBOT's first stage: without teacher.workdir the teacher is a frozen random encoder of this
    architecture, from a key of its own."""
    config = load_config("mae_digits.py:tiny", "loss.target=teacher", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
    _, states = run_steps(config, 1)
    assert jax.tree.structure(states[0]["teacher"]) == jax.tree.structure(states[0]["params"]["encoder"])
    kernel = lambda tree: tree["blocks"]["blocks"]["attn"]["query"]
    assert np.abs(kernel(states[0]["teacher"]) - kernel(states[0]["params"]["encoder"])).max() > 1e-3
    np.testing.assert_array_equal(kernel(states[1]["teacher"]), kernel(states[0]["teacher"]))


def test_bad_teacher_workdirs_are_named(data_dir, tmp_path, finished_mae):
    from maskjax.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.workdir"):
        step_lib.validate(load_config("mae_digits.py:tiny", "loss.target=teacher", f"teacher.workdir={tmp_path}/none"),
                          num_devices=8)
    with pytest.raises(ConfigError, match="teacher.workdir.*token grid"):  # another patch size: other tokens
        step_lib.validate(load_config("mae_digits.py:tiny", "loss.target=teacher", f"teacher.workdir={finished_mae}",
                                      "model.patch_size=2"), num_devices=8)
    with pytest.raises(ConfigError, match="loss.target"):
        step_lib.validate(load_config("simmim_digits.py:tiny", "loss.target=teacher"), num_devices=8)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at step 3"):
        step_lib.saved_params(finished_mae, 3, ("encoder",))


def test_a_frozen_teacher_from_a_transformers_directory_is_that_models_encoder(data_dir, finished_mae, tmp_path):
    """teacher.hf_dir: the finished MAE run exported as transformers' ViTMAE (model.safetensors +
    config.json) and imported back as the frozen teacher equals the encoder restored from the run itself;
    the teacher's sizes come from the file's config.json, so a wider teacher than the student works."""
    from maskjax import cli

    exported = str(tmp_path / "hf")
    assert cli.main(["export", "--workdir", finished_mae, "--out", exported]) == 0
    config = load_config("mae_digits.py:tiny", "loss.target=teacher", f"teacher.hf_dir={exported}", "model.width=48",
                         "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", data_dir=data_dir)
    setup = step_lib.build(config)
    state = setup.init_fn()
    saved, _ = step_lib.saved_params(finished_mae, 0, ("encoder",))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(state["teacher"]))[0],
                            jax.tree.leaves(saved)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert setup.objective.target_dim == json.load(open(os.path.join(exported, "config.json")))["hidden_size"] != 48
    with pytest.raises(objectives.base.ConfigError, match="teacher.hf_dir"):
        step_lib.validate(load_config("mae_digits.py:tiny", "loss.target=teacher", f"teacher.hf_dir={tmp_path}/none"),
                          num_devices=8)


def test_collapse_monitors_are_fairseqs_compute_var_on_the_hidden_tokens():
    rng = np.random.default_rng(0)
    x, hidden = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.random((2, 5)) < 0.6
    want = np.sqrt(x[hidden].var(axis=0, ddof=1) + 1e-6).mean()
    got = data2vec._spread(jnp.asarray(x), jnp.asarray(hidden, jnp.float32))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
