"""Export to and import from Hugging Face transformers (PyTorch, CPU) and timm-named .npz archives.

Small trained runs (MAE, SimMIM, post-norm MLM) are exported; transformers loads them with its own
classes and must produce maskjax's outputs on the same inputs within 1e-4; importing an export and
exporting again gives back the same tensors; shape, config and architecture mismatches are one-line
errors naming the parameter or key.
"""
import json
import os

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, load_config, random_images, to_torch_images
from maskjax import step as step_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _run(workdir, name, *overrides, data_dir):
    """Trains configs/<name> in-process (a few steps) and returns its config."""
    from maskjax import cli

    args = ["train", "--config", os.path.join(ROOT, "configs", name), "--workdir", str(workdir), "--no_eval",
            f"--config.data.data_dir={data_dir}", *[f"--config.{o}" for o in overrides]]
    assert cli.main(args) == 0
    return load_config(name, *overrides, data_dir=data_dir)


def _export(workdir, out, *extra):
    from maskjax import cli

    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), *extra]) == 0


def _params(config, workdir):
    from maskjax import checkpoint

    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    state = ckpt.restore_state(ckpt.latest_step(), setup.abstract_state)
    ckpt.close()
    return setup, step_lib.host_params(state["params"])


def _model(setup, params):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    return nnx.merge(setup.graphdef, jax.tree.map(jnp.asarray, params))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("interop")
    mae = _run(root / "mae", "mae_digits.py:tiny", "model.qkv_bias=True", data_dir=data_dir)
    simmim = _run(root / "simmim", "simmim_digits.py:tiny", data_dir=data_dir)
    mlm = _run(root / "mlm", "mlm_text.py:tiny", "model.qkv_bias=True", "model.norm_eps=1e-12", data_dir=data_dir)
    return {"root": root, "mae": (root / "mae", mae), "simmim": (root / "simmim", simmim), "mlm": (root / "mlm", mlm)}


def _exported(runs, name, *extra):
    """(workdir, config, maskjax model of the run's newest checkpoint, export directory)."""
    workdir, config = runs[name]
    out = runs["root"] / f"{name}_hf{''.join(extra).replace('-', '_')}"
    _export(workdir, out, *extra)
    return workdir, config, _model(*_params(config, workdir)), out


def _mae_predict(model, config, patches, seed):
    """maskjax MAE predictions with the kept patches transformers picks for ``noise``: it keeps
    argsort(noise)[:kept] and unshuffles with argsort(argsort(noise)). -> (noise, keep_idx, predictions)."""
    batch, length = patches.shape[:2]
    kept = int(length * (1 - config.mask.ratio))
    noise = np.random.default_rng(seed).uniform(size=(batch, length)).astype(np.float32)
    order = np.argsort(noise, axis=1)
    keep_idx, restore_idx = order[:, :kept], np.argsort(order, axis=1)
    return noise, keep_idx, model.decoder.pred(model.decoder(model.encoder(patches, keep_idx), restore_idx))


def test_mae_export_matches_vitmae_and_vit(runs):
    from maskjax.models import vit

    workdir, config, model, out = _exported(runs, "mae")
    images = random_images(config)
    patches = vit.patchify(images, config.model.patch_size)
    batch, length = patches.shape[:2]
    noise, keep_idx, ours = _mae_predict(model, config, patches, seed=1)

    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(out)).eval()
    with torch.no_grad():
        result = hf(pixel_values=to_torch_images(images), noise=torch.from_numpy(noise))
    np.testing.assert_allclose(result.logits.numpy(), np.asarray(ours), atol=TOL, rtol=0)
    hidden = np.ones((batch, length), bool)
    np.put_along_axis(hidden, keep_idx, False, axis=1)
    np.testing.assert_array_equal(result.mask.numpy().astype(bool), hidden)

    # The encoder alone as a ViTModel: every patch visible, cls first.
    _export(workdir, runs["root"] / "mae_vit", "--arch", "vit")
    vit_model = transformers.ViTModel.from_pretrained(str(runs["root"] / "mae_vit"), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden_states = vit_model(pixel_values=to_torch_images(images)).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden_states, np.asarray(model.encoder(patches)), atol=TOL, rtol=0)


def test_simmim_export_matches_vit_for_masked_image_modeling(runs):
    from maskjax.models import vit

    _, config, model, out = _exported(runs, "simmim")
    images = random_images(config, seed=2)
    patches = vit.patchify(images, config.model.patch_size)
    hidden = np.random.default_rng(3).uniform(size=patches.shape[:2]) < 0.5
    ours = vit.unpatchify(np.asarray(model(patches, hidden)), images.shape[1:], config.model.patch_size)

    hf = transformers.ViTForMaskedImageModeling.from_pretrained(str(out)).eval()
    with torch.no_grad():
        result = hf(pixel_values=to_torch_images(images), bool_masked_pos=torch.from_numpy(hidden))
    np.testing.assert_allclose(result.reconstruction.numpy(), np.asarray(ours).transpose(0, 3, 1, 2), atol=TOL, rtol=0)


def test_mlm_export_matches_bert_for_masked_lm(runs):
    _, config, model, out = _exported(runs, "mlm")
    assert os.path.isfile(out / "vocab.txt")
    vocab = model.token_embed.shape[0]
    length = config.data.seq_len
    tokens = np.random.default_rng(4).integers(5, vocab, (2, length)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    ours = model.logits(model(tokens, np.ones_like(tokens), positions))

    hf = transformers.BertForMaskedLM.from_pretrained(str(out)).eval()
    assert hf.config.layer_norm_eps == 1e-12
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(ours), atol=TOL, rtol=0)
    tokenizer = transformers.BertTokenizer.from_pretrained(str(out))
    assert tokenizer.mask_token_id is not None and len(tokenizer) == vocab


def _fresh(config):

    setup = step_lib.build(config)
    return step_lib.host_params(setup.init_fn()["params"])


def _tensors(path):
    from maskjax import export

    if str(path).endswith(".npz"):
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    return export.read(str(path))[0]


@pytest.mark.parametrize("name,fmt,arch", [("mae", "hf", None), ("mae", "npz", None), ("mae", "hf", "vit"),
                                            ("simmim", "hf", None), ("mlm", "hf", None), ("mlm", "npz", None)])
def test_import_then_export_gives_back_the_same_tensors(runs, name, fmt, arch):
    """Import reproduces the checkpoint's parameters; exporting them again reproduces the file."""
    from maskjax import export

    workdir, config = runs[name]
    stem = f"{name}_{arch or 'own'}"
    first = runs["root"] / (f"{stem}_first.npz" if fmt == "npz" else f"{stem}_first")
    _export(workdir, first, "--format", fmt, *(["--arch", arch] if arch else []))
    params, report = export.import_params(config, _fresh(config), str(first))
    assert ("freshly initialised: MAE decoder" in report) == (arch == "vit")
    trained = _params(config, workdir)[1]
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(trained)):
        if arch != "vit" or "encoder" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, b)
    again = runs["root"] / (f"{stem}_again.npz" if fmt == "npz" else f"{stem}_again")
    export.export(config, params, fmt, str(again), arch)
    a, b = _tensors(first), _tensors(again)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_timm_names_follow_the_mae_release(runs):
    workdir, config = runs["mae"]
    out = runs["root"] / "mae_names.npz"
    _export(workdir, out, "--format", "npz")
    tensors = _tensors(out)
    d, p = config.model.width, config.model.patch_size
    assert tensors["patch_embed.proj.weight"].shape == (d, config.data.channels, p, p)
    assert tensors["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert tensors["blocks.0.attn.qkv.bias"].shape == (3 * d,)
    assert tensors["pos_embed"].shape == (1, 1 + (config.data.image_size // p) ** 2, d)
    assert {"cls_token", "norm.weight", "mask_token", "decoder_pred.weight", "decoder_blocks.0.mlp.fc1.weight",
            f"blocks.{config.model.depth - 1}.mlp.fc2.bias"} <= set(tensors)


def test_training_starts_from_an_export(runs, data_dir, capsys):
    """init_from: a SimMIM run starting from the MAE export keeps the encoder, freshly initialises its head."""
    from maskjax import cli

    mae_dir, mae_config = runs["mae"]
    out = runs["root"] / "mae_init"
    _export(mae_dir, out)
    workdir = runs["root"] / "from_mae"
    args = ["train", "--config", os.path.join(ROOT, "configs", "simmim_digits.py:tiny"), "--workdir", str(workdir),
            "--no_eval", f"--config.data.data_dir={data_dir}", "--config.model.qkv_bias=True",
            f"--config.init_from={out}", "--config.total_steps=1", "--config.optim.warmup_steps=0", "--config.seed=1"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "initialised" in err and "SimMIM mask token and head" in err and "ignored" in err
    # The run's checkpoint after one step: its encoder is the MAE encoder moved by one AdamW step (about the
    # learning rate per weight), far closer to it than the run's own initialisation (seed 1) is.
    config = load_config("simmim_digits.py:tiny", "model.qkv_bias=True", "seed=1", data_dir=data_dir)
    trained = _params(config, workdir)[1]["encoder"]
    mae = _params(mae_config, mae_dir)[1]["encoder"]
    distance = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert distance(trained, mae) < 0.1 * distance(_fresh(config)["encoder"], mae)


def _error(capsys, args):
    from maskjax import cli

    status = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("maskjax: error:")]
    assert status == 2 and len(errors) == 1, err
    return errors[0]


def test_mismatches_are_one_line_errors(runs, data_dir, capsys, tmp_path):
    from safetensors.numpy import save_file

    from maskjax import config as config_lib
    from maskjax import export
    from maskjax.config import ConfigError

    mae_dir, mae_config = runs["mae"]
    out = runs["root"] / "mae_err"
    _export(mae_dir, out)
    # Through the CLI: one error line naming the key and the file's value; nothing written.
    line = _error(capsys, ["train", "--config", os.path.join(ROOT, "configs", "mae_digits.py:tiny"), "--no_eval",
                           "--workdir", str(tmp_path / "a"), f"--config.data.data_dir={data_dir}",
                           "--config.model.qkv_bias=True", f"--config.init_from={out}", "--config.model.width=48"])
    assert "model.width" in line and "hidden_size=32" in line
    assert not os.path.exists(tmp_path / "a" / "checkpoints" / "1")
    fresh = _fresh(mae_config)
    with pytest.raises(ConfigError, match="model.qkv_bias"):
        export.import_params(config_lib.override(load_config("mae_digits.py:tiny"), ["model.qkv_bias=False"]),
                             _fresh(load_config("mae_digits.py:tiny", data_dir=data_dir)), str(out))

    # A file without config.json whose tensor has another shape: the tensor and the parameter are named.
    tensors = export.read(str(out))[0]
    tensors["vit.encoder.layer.1.intermediate.dense.weight"] = np.zeros((96, 32), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(export.InteropError, match=r"vit.encoder.layer.1.intermediate.dense.weight.*"
                                                  r"encoder/blocks/blocks/mlp/fc1/kernel"):
        export.import_params(mae_config, fresh, str(bad))

    # A deeper file than the config: the extra layer is named, not silently dropped.
    del tensors["vit.encoder.layer.1.intermediate.dense.weight"]
    for key in [k for k in tensors if k.startswith("vit.encoder.layer.1.")]:
        tensors[key.replace("layer.1.", "layer.2.")] = tensors[key]
    tensors["vit.encoder.layer.1.intermediate.dense.weight"] = tensors["vit.encoder.layer.0.intermediate.dense.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.depth.*vit.encoder.layer.2."):
        export.import_params(mae_config, fresh, str(bad))

    # Unsupported architectures: a pre-norm text encoder as BERT, a video MAE, MAE weights as BERT.
    with pytest.raises(ConfigError, match="model.pre_norm"):
        export.check_exportable(load_config("mlm_text.py:tiny", "model.pre_norm=True"), "bert")
    with pytest.raises(ConfigError, match="data.frames"):
        export.check_exportable(load_config("videomae_digits.py:tiny"), "vit_mae")
    # A video MAE laid out as VideoMAE exports as VideoMAEForPreTraining by default (test_equivalence
    # compares its loss and gradients); MAE-ST's layout is not VideoMAE's, and says which key differs.
    assert export.default_arch(load_config("videomae_digits.py:tiny")) == "videomae"
    assert export.default_arch(mae_config) == "vit_mae"
    with pytest.raises(ConfigError, match="model.pos_embed"):
        export.check_exportable(load_config("videomae_digits.py:tiny,st"), "videomae")
    with pytest.raises(ConfigError, match="data.frames"):
        export.check_exportable(mae_config, "videomae")
    line = _error(capsys, ["export", "--workdir", str(mae_dir), "--out", str(tmp_path / "y"), "--arch", "bert"])
    assert "--arch bert" in line and "vit_mae" in line
    mlm_dir, mlm_config = runs["mlm"]
    _export(mlm_dir, tmp_path / "mlm")
    with pytest.raises(export.InteropError, match="not a ViT"):
        export.import_params(mae_config, fresh, str(tmp_path / "mlm"))
    with pytest.raises(export.InteropError, match="not a BERT"):
        export.import_params(mlm_config, _fresh(mlm_config), str(out))


def test_config_json_describes_the_run(runs):
    out = runs["root"] / "mae_hf_cfg"
    workdir, config = runs["mae"]
    _export(workdir, out)
    info = json.loads((out / "config.json").read_text())
    assert info["architectures"] == ["ViTMAEForPreTraining"] and info["hidden_size"] == config.model.width
    assert info["decoder_num_hidden_layers"] == config.decoder.depth and info["qkv_bias"] is True


def test_sincos_table_is_the_one_transformers_and_the_mae_release_compute():
    """Published MAE weights were trained with this table (the MAE release's column-first layout):
    transformers' ViTMAE computes it itself when it initialises a model."""
    from maskjax import export

    for width in (32, 64):
        config = load_config("mae_digits.py:tiny", f"model.width={width}")
        hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**export.hf_config(config, "vit_mae")))
        embeddings = hf.vit.embeddings
        embeddings.patch_embeddings.projection._is_hf_initialized = False
        embeddings.initialize_weights()
        np.testing.assert_allclose(embeddings.position_embeddings.detach().numpy(),
                                   export.position_tables(config, "vit_mae")["vit.embeddings.position_embeddings"],
                                   atol=1e-6)


def _import_model(config, path):
    """A maskjax model of ``config`` initialised from ``path`` (the trainer's own init_from path)."""
    from maskjax import config as config_lib

    config = config_lib.override(config, [f"init_from={path}"])
    setup = step_lib.build(config)
    state, report = step_lib.initialize_from(setup, setup.init_fn(), str(path))
    return _model(setup, step_lib.host_params(state["params"])), report


def test_models_saved_by_transformers_import_and_match(tmp_path, data_dir):
    """Files written by transformers itself (its own names, BERT's token-type table, tied output
    matrix, a sin-cos decoder table as on the Hub) give maskjax models with the same outputs."""
    import jax.numpy as jnp

    from maskjax import export
    from maskjax.models import vit

    torch.manual_seed(0)
    config = load_config("mae_digits.py:tiny", "model.qkv_bias=True", "model.norm_eps=1e-12", data_dir=data_dir)
    info = dict(export.hf_config(config, "vit_mae"), layer_norm_eps=1e-12)
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**info)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # trained-looking weights (transformers' init leaves biases at zero)
            p.add_(0.05 * torch.randn_like(p))
        tables = export.position_tables(config, "vit_mae")
        hf.vit.embeddings.position_embeddings.copy_(torch.from_numpy(tables["vit.embeddings.position_embeddings"]))
        hf.decoder.decoder_pos_embed.copy_(torch.from_numpy(tables["decoder.decoder_pos_embed"]))
    hf.save_pretrained(str(tmp_path / "vitmae"))
    model, report = _import_model(config, tmp_path / "vitmae")
    assert "freshly" not in report
    images = random_images(config, seed=5)
    noise, _, ours = _mae_predict(model, config, vit.patchify(images, config.model.patch_size), seed=6)
    with torch.no_grad():
        theirs = hf(pixel_values=to_torch_images(images), noise=torch.from_numpy(noise)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)

    text = load_config("mlm_text.py:tiny", "model.qkv_bias=True", "model.norm_eps=1e-12", data_dir=data_dir)
    from maskjax.objectives import get as get_objective

    vocab = get_objective(text).tokenizer.vocab_size
    bert_config = transformers.BertConfig(vocab_size=vocab, hidden_size=text.model.width,
                                          num_hidden_layers=text.model.depth, num_attention_heads=text.model.heads,
                                          intermediate_size=int(text.model.width * text.model.mlp_ratio),
                                          max_position_embeddings=text.model.max_len, layer_norm_eps=1e-12)
    bert = transformers.BertForMaskedLM(bert_config).eval()
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bert.save_pretrained(str(tmp_path / "bert"))
    model, _ = _import_model(text, tmp_path / "bert")
    tokens = np.random.default_rng(7).integers(5, vocab, (2, text.data.seq_len)).astype(np.int32)
    positions = np.broadcast_to(np.arange(text.data.seq_len, dtype=np.int32), tokens.shape)
    ours = model.logits(model(jnp.asarray(tokens), jnp.ones_like(tokens), jnp.asarray(positions)))
    with torch.no_grad():
        theirs = bert(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=TOL, rtol=0)


def test_flip_image_tower_exports_as_vit_model(tmp_path, data_dir):
    """FLIP's image tower (under ``image``) as a ViTModel, from freshly initialised parameters."""
    import jax.numpy as jnp

    from maskjax import export
    from maskjax.models import vit

    config = load_config("flip_digits.py:tiny", data_dir=data_dir)
    setup = step_lib.build(config)
    params = step_lib.host_params(setup.init_fn()["params"])
    params["image"]["patch_embed"]["bias"] = params["image"]["patch_embed"]["bias"] + 0.1  # not all zero, so a misplaced bias would show
    export.export(config, params, "hf", str(tmp_path / "flip"))
    info = json.loads((tmp_path / "flip" / "config.json").read_text())
    assert info["architectures"] == ["ViTModel"]
    images = random_images(config, seed=8)
    ours = _model(setup, params).image(vit.patchify(jnp.asarray(images), config.model.patch_size))
    hf = transformers.ViTModel.from_pretrained(str(tmp_path / "flip"), add_pooling_layer=False).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=to_torch_images(images)).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=TOL, rtol=0)
