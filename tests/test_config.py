"""Config loading, overrides and validation: every error names its key; the CLI exits 2 and writes nothing."""
import os
import subprocess
import sys

import pytest

from maskjax import step as step_lib
from maskjax import config as config_lib
from tests.conftest import ROOT, load_config


def test_shipped_configs_validate():
    for spec in ("mae_digits.py", "mae_digits.py:tiny", "simmim_digits.py", "mae_imagenet.py:vit_b16",
                 "mae_imagenet.py:vit_l16"):
        step_lib.validate(load_config(spec), num_devices=8)


def test_imagenet_recipe_matches_the_paper():
    c = load_config("mae_imagenet.py:vit_l16")
    assert (c.model.width, c.model.depth, c.model.heads, c.model.patch_size) == (1024, 24, 16, 16)
    assert (c.decoder.depth, c.decoder.width) == (8, 512)
    assert c.mask.ratio == 0.75 and c.batch_size == 4096 and c.loss.norm_pix
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert config_lib.lr(c) == pytest.approx(1.5e-4 * 4096 / 256)
    assert c.optim.warmup_steps == config_lib.steps_for_epochs(40, 1_281_167, 4096)


def test_overrides_are_typed():
    c = load_config("mae_digits.py", "model.depth=6", "mask.ratio=0.5", "loss.norm_pix=false",
                    "data.crop_scale=(0.3, 1.0)", "optim.base_lr=1")
    assert c.model.depth == 6 and c.mask.ratio == 0.5 and c.loss.norm_pix is False
    assert c.data.crop_scale == (0.3, 1.0) and c.optim.base_lr == 1.0


@pytest.mark.parametrize("overrides,key", [
    (["model.depthh=3"], "model.depthh"),
    (["nothing.here=3"], "nothing"),
    (["model.depth=abc"], "model.depth"),
    (["loss.norm_pix=maybe"], "loss.norm_pix"),
    (["model.patch_size=5"], "data.image_size"),
    (["batch_size=100"], "batch_size"),
    (["mask.ratio=1.0"], "mask"),
    (["mask.ratio=-0.2"], "mask"),
    (["model.heads=5"], "model.heads"),
    (["objective=bert_wrong"], "objective"),
    (["mesh.data=3"], "mesh"),
    (["optim.warmup_steps=99999"], "optim.warmup_steps"),
    (["model.dtype=float8"], "model.dtype"),
    (["mask.kind=stripes"], "mask"),
    (["model.attention=flash"], "model.attention"),
    (["model.attention=cudnn"], "model.attention"),  # no CUDA GPU here
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError) as err:
        c = load_config("mae_digits.py", *overrides)
        step_lib.validate(c, num_devices=8)
    assert err.value.key == key
    assert str(err.value).startswith(f"config.{key}")


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "maskjax", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--config.model.patch_size=5"], "config.data.image_size"),
    (["--config.model.nope=1"], "config.model.nope: unknown key"),
    (["--config.batch_size=100"], "config.batch_size"),
    (["--config.data.name=mnist"], "dataset 'mnist' is not prepared in data_dir"),
])
def test_cli_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    workdir = tmp_path / "run"
    out = _cli("train", "--config", "configs/mae_digits.py:tiny", "--workdir", str(workdir), *args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("maskjax: error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_cli_missing_config_file(tmp_path):
    out = _cli("train", "--config", "configs/nope.py", "--workdir", str(tmp_path / "r"))
    assert out.returncode == 2 and "configs/nope.py" in out.stderr and "Traceback" not in out.stderr


def test_overriding_the_objective_brings_its_config_groups():
    """A sweep or command line that switches a recipe to another objective gets that objective's
    groups with their defaults, so its own fields can be overridden in the same command."""
    from maskjax import objectives  # noqa: F401  (registers the objectives and the groups hook)

    config = config_lib.override(load_config("mlm_text.py"), ["objective=electra", "electra.disc_weight=10"])
    assert config.electra.disc_weight == 10.0 and config.electra.generator_ratio == 0.25
    with pytest.raises(config_lib.ConfigError, match="electra"):
        config_lib.override(load_config("mlm_text.py"), ["electra.disc_weight=10"])
