"""The trainer: exact resume, identical losses across meshes, FSDP/tensor sharding, logs and eval outputs."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from maskjax import step as step_lib
from maskjax import metrics, sharding, train
from tests.conftest import load_config


def tiny(data_dir, *overrides):
    return load_config("mae_digits.py:tiny", "log_every=1", *overrides, data_dir=data_dir)


def losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def params_of(summary):
    return jax.tree.map(np.asarray, jax.device_get(summary["state"]["params"]))


def test_resume_is_exact(data_dir, tmp_path):
    config = tiny(data_dir, "total_steps=8", "checkpoint.every=3")
    straight = train.train(config, str(tmp_path / "straight"), evaluate=False, quiet=True)
    part = tmp_path / "interrupted"
    first = train.train(config, str(part), stop_at=5, evaluate=False, quiet=True)
    assert first["end_step"] == 5
    resumed = train.train(config, str(part), evaluate=False, quiet=True)
    assert resumed["start_step"] == 5
    assert losses(part) == losses(tmp_path / "straight")  # bit-identical, no duplicated steps
    assert [s for s, _ in losses(part)] == list(range(1, 9))
    for a, b in zip(jax.tree.leaves(params_of(straight)), jax.tree.leaves(params_of(resumed))):
        np.testing.assert_array_equal(a, b)
    runs = metrics.read_jsonl(str(part / "runs.jsonl"))
    assert [r["start_step"] for r in runs] == [0, 5]


@pytest.fixture(scope="module")
def data_parallel_losses(data_dir, tmp_path_factory):
    reference = tiny(data_dir, "total_steps=3", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")
    workdir = tmp_path_factory.mktemp("data_parallel")
    train.train(reference, str(workdir), evaluate=False, quiet=True)
    return losses(workdir)


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2)])
def test_same_losses_on_every_mesh(data_dir, tmp_path, mesh, data_parallel_losses):
    d, f, t = mesh
    config = tiny(data_dir, "total_steps=3", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
    train.train(config, str(tmp_path / "mesh"), evaluate=False, quiet=True)
    ref, got = data_parallel_losses, losses(tmp_path / "mesh")
    assert [s for s, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=0, atol=1e-5)


def test_fsdp_and_tensor_axes_shard_parameters(data_dir):
    config = tiny(data_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    setup = step_lib.build(config)
    shardings = setup.state_shardings["params"]["encoder"]["blocks"]["blocks"]
    assert tuple(shardings["attn"]["query"].spec) == (None, "fsdp", "tensor", None)
    assert tuple(shardings["mlp"]["fc1"]["kernel"].spec) == (None, "fsdp", "tensor")
    state = setup.init_fn()
    query = state["params"]["encoder"]["blocks"]["blocks"]["attn"]["query"]
    assert query.sharding.spec == shardings["attn"]["query"].spec
    shard_shape = query.addressable_shards[0].data.shape
    assert shard_shape == (query.shape[0], query.shape[1] // 2, query.shape[2] // 2, query.shape[3])
    mu = jax.tree.leaves(state["opt_state"])  # Adam moments follow the parameters' sharding
    assert any(getattr(x, "sharding", None) is not None and "fsdp" in str(x.sharding.spec) for x in mu)


def test_gradient_accumulation_equals_the_full_batch(data_dir, tmp_path):
    """Micro-batch i is rows i, i + accum, ...: every device's block feeds every micro-batch, so the
    compiled step has no all-gather or permute of the batch (contiguous blocks had 6 and 8 here). Each
    example's mask comes from the step key and its row, so accumulating 4 micro-batches gives the full
    batch's masks, loss, gradients and update (MAE's loss has the same hidden count in every row)."""
    full, accum = (step_lib.build(tiny(data_dir, f"optim.grad_accum={n}", "total_steps=6", "batch_size=32"))
                   for n in (1, 4))
    hlo = accum.step_fn.lower(accum.abstract_state, accum.abstract_batch()).compile().as_text()
    assert "all-gather" not in hlo and "collective-permute" not in hlo
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(32, 16, 16, 1)).astype(np.float32), "label": np.zeros(32, np.int32)}
               for _ in range(2)]
    results = []
    for setup in (full, accum):  # two steps: the second one's update goes through Adam's moments
        state = setup.init_fn()
        for local in batches:
            state, step_metrics = setup.step_fn(state, setup.global_batch(local))
        results.append((jax.device_get(step_metrics), jax.tree.map(np.asarray, jax.device_get(state["params"]))))
    (m_full, p_full), (m_acc, p_acc) = results
    for name in ("loss", "grad_norm", "mask_ratio"):
        assert float(m_acc[name]) == pytest.approx(float(m_full[name]), rel=1e-5), name
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_acc)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    config = tiny(data_dir, "optim.grad_accum=4", "batch_size=32", "total_steps=3")
    summary = train.train(config, str(tmp_path / "accum"), evaluate=False, quiet=True)
    assert len(summary["losses"]) == config.total_steps and all(np.isfinite(l) for _, l in summary["losses"])


def test_outputs_metrics_tensorboard_eval_and_png(data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = tiny(data_dir, "total_steps=4", "eval.finetune_epochs=0.5", "eval.finetune_lr=0.005")
    summary = train.train(config, str(workdir), quiet=True)
    records = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
    for key in ("step", "loss", "learning_rate", "examples_per_sec", "grad_norm"):
        assert key in records[0]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    with open(workdir / "eval.json") as f:
        result = json.load(f)
    assert result["step"] == 4 and result["num_test"] == 360
    # Raw pixels on this split: linear probe 0.961, 20-NN 0.967 (README); four steps of training leave
    # the encoder close to its initialisation, whose features still separate digits far above chance.
    assert result["raw_pixels"]["linear_probe"] == pytest.approx(0.961, abs=0.02)
    assert result["raw_pixels"]["knn"] == pytest.approx(0.967, abs=0.02)
    for group in ("pretrained", "random_init"):
        assert 0.5 < result[group]["linear_probe"] <= 1.0 and 0.3 < result[group]["knn"] <= 1.0, result[group]
    tuned = result["finetune"]  # end-to-end fine-tuning: half an epoch of digits at batch 32
    assert tuned["steps"] == 23 and 0.15 < tuned["accuracy"] <= 1.0, tuned
    assert tuned["train_loss_last"] < tuned["train_loss_first"]
    png = workdir / "reconstructions" / "step_0000004.png"
    assert png.exists() and summary["eval"]["reconstruction_png"].endswith("step_0000004.png")
    from PIL import Image

    assert Image.open(png).size[0] > 4 * 16
    with open(workdir / "config.json") as f:
        assert json.load(f)["objective"] == "mae"
