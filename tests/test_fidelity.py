"""Regressions from the review against the official code, and ``maskjax params`` (each parameter's
role, weight decay and sharding, from abstract shapes only)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import step as step_lib
from maskjax import cli, config as config_lib, masking, objectives
from tests.conftest import ROOT, load_config


def _params_json(capsys, tmp_path, spec, *extra):
    out = tmp_path / "params.json"
    assert cli.main(["params", "--config", os.path.join(ROOT, "configs", spec), "--json", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert "weight decay" in printed and "per device" in printed
    result = json.loads(out.read_text())
    return {row["path"]: row for row in result["rows"]}, result["totals"]


def test_mae_recipe_decays_every_kernel_and_nothing_else(capsys, tmp_path):
    rows, totals = _params_json(capsys, tmp_path, "mae_imagenet.py:vit_b16")
    assert rows["encoder/blocks/blocks/attn/query_bias"]["shape"] == [12, 12, 64]  # two named axes, still a bias
    for path, row in rows.items():
        leaf = path.rsplit("/", 1)[-1]
        is_kernel = leaf in ("kernel", "query", "key", "value", "out")
        assert row["weight_decay"] == is_kernel, path
        assert row["role"] == ("kernel" if is_kernel else row["role"])
        if leaf.endswith("bias") and "norm" not in path:
            assert row["role"] == "bias", path
        assert row["trainable"]
    assert rows["encoder/cls"]["role"] == "token" and rows["decoder/mask_token"]["role"] == "token"
    assert totals["parameters"] == sum(r["size"] for r in rows.values())
    assert totals["decayed"] == sum(r["size"] for r in rows.values() if r["weight_decay"])


def test_flip_recipe_decays_what_flips_optimizer_decays(capsys, tmp_path, data_dir):
    from maskjax.data import sources

    vocab = os.path.join(sources.builder(load_config("flip_digits.py", data_dir=data_dir).data).data_dir, "vocab.txt")
    rows, _ = _params_json(capsys, tmp_path, "flip_laion.py:vit_b16", f"--config.data.tokenizer={vocab}",
                           f"--config.data.data_dir={data_dir}")
    assert rows["image_proj/kernel"]["weight_decay"] and rows["text_proj/kernel"]["weight_decay"]
    assert rows["image_proj/kernel"]["axes"] == ["embed", None]  # one named axis, still a weight matrix
    # facebookresearch/flip decays everything but biases, LayerNorm scales and position tables
    assert rows["log_scale"]["role"] == "temperature" and rows["log_scale"]["weight_decay"]
    assert rows["text/token_embed"]["weight_decay"] and rows["image/cls"]["weight_decay"]
    assert not rows["text/pos_embed"]["weight_decay"] and not rows["image/norm/scale"]["weight_decay"]
    assert not rows["image/patch_embed/bias"]["weight_decay"]


def test_bert_recipe_decays_embedding_and_position_tables(capsys, tmp_path, data_dir):
    rows, _ = _params_json(capsys, tmp_path, "bert_base.py:128", "--config.data.name=maskjax_text",
                           f"--config.data.data_dir={data_dir}")
    assert rows["token_embed"]["weight_decay"] and rows["pos_embed"]["weight_decay"]  # google-research/bert
    assert not rows["output_bias"]["weight_decay"] and not rows["embed_norm/scale"]["weight_decay"]


def test_params_shows_sharding_and_bytes_per_device(capsys, tmp_path):
    one, totals_one = _params_json(capsys, tmp_path, "mae_digits.py", "--mesh", "data=8")
    sharded, totals_fsdp = _params_json(capsys, tmp_path, "mae_digits.py", "--mesh", "fsdp=8")
    assert one["encoder/patch_embed/kernel"]["sharding"] == "(-, -)"
    assert sharded["encoder/patch_embed/kernel"]["sharding"] == "(-, fsdp)"
    assert totals_fsdp["parameter_bytes_per_device"] < 0.3 * totals_one["parameter_bytes_per_device"]
    assert totals_one["optimizer_bytes_per_device"] == 2 * totals_one["parameter_bytes_per_device"] + 4 * 2
    whole, _ = _params_json(capsys, tmp_path, "mae_digits.py", "--mesh", "fsdp=8",
                            "--config.sharding_rules=(('embed', None),)")  # the rules table overridden
    assert whole["encoder/patch_embed/kernel"]["sharding"] == "(-, -)"


def test_params_bad_input_is_one_line(capsys):
    path = os.path.join(ROOT, "configs", "mae_digits.py")
    assert cli.main(["params", "--config", path, "--mesh", "rows=8"]) == 2
    assert "--mesh 'rows=8'" in capsys.readouterr().err
    assert cli.main(["params", "--config", path, "--config.optim.decay_roles=('kernels',)"]) == 2
    assert "config.optim.decay_roles" in capsys.readouterr().err
    assert cli.main(["params", "--config", path, "--config.sharding_rules=(('embedding', None),)"]) == 2
    assert "config.sharding_rules" in capsys.readouterr().err


def test_flip_recipe_temperature_starts_inside_the_clip():
    """FLIP's learnable logit scale starts at 1/0.07 and its log is clipped to [0, log 100]; a start at
    1/0.01 = 100 sits on the clip (exp(log 100) > 100 in float32), where it never learns."""
    config = load_config("flip_laion.py:vit_b16")
    assert config.flip.init_temperature == 0.07 and config.flip.max_logit_scale == 100.0
    start = np.float32(math.log(1 / config.flip.init_temperature))
    assert 0 < start < np.float32(math.log(config.flip.max_logit_scale))


@pytest.mark.parametrize("ratio,hidden", [(0.25, 1), (0.5, 2), (0.7, 2), (0.875, 3), (0.9, 3), (0.99, 3)])
def test_running_cell_hides_int_4r_per_cell(ratio, hidden):
    """VideoMAE V2's RunningCellMaskingGenerator: int(4 * ratio) of each 2x2 cell (round() gave 4 for
    ratios from 0.875 and crashed the first step)."""
    mask = masking.running_cell_mask(jax.random.key(0), 2, 3, (4, 4), ratio)
    cells = np.asarray(mask.mask).reshape(2, 3, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4)
    assert (cells.sum(-1) == hidden).all()


def test_dual_masking_trains_at_a_high_decoder_ratio():
    config = load_config("videomae_digits.py:tiny,dual", "mask.decoder_ratio=0.9")
    step_lib.validate(config, num_devices=8)
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(0))
    batch = {k: jnp.ones(shape, dtype) for k, (shape, dtype) in objective.batch_spec().items()}
    batch["image"] = jax.random.normal(jax.random.key(1), batch["image"].shape)
    loss, metrics = objective.loss(model, batch, jax.random.key(2), 0)
    assert np.isfinite(float(loss)) and float(metrics["decoded_ratio"]) > 0


def test_float16_mfu_uses_the_half_precision_peak():
    from maskjax import bench

    class Device:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"

    assert bench.table_peak(Device, "float16") == bench.table_peak(Device, "bfloat16") == 989e12


def test_saved_configs_read_new_fields_as_defaults():
    saved = load_config("mae_digits.py:tiny").to_dict()
    del saved["optim"]["decay_roles"], saved["loss"]["norm_pix_mode"], saved["hpm"]["weight"]
    config = objectives.from_saved(json.loads(json.dumps(saved)))
    assert tuple(config.optim.decay_roles) == ("kernel",) and config.loss.norm_pix_mode == "patch"
    assert config.hpm.weight == 1.0 and "mlm" not in config  # its objective's groups, no other
    assert config.batch_size == saved["batch_size"]
