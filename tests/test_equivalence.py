"""Reference equivalence: maskjax's losses, gradients and optimizer steps against independent
implementations (Hugging Face transformers and PyTorch, CPU, float32) on identical weights and inputs.

Weights are made identical by maskjax's own export (the interop tests check that mapping on outputs);
every parameter is moved off its initial value first, so zero biases and unit norm scales take part.
Gradients are compared in transformers' layout: the export's tensor mapping is linear (reshape,
transpose, split), so it maps gradients as it maps weights.

Covered (the MAE and BERT comparisons also with ``model.scan_layers=False``): MAE = ``ViTMAEForPreTraining``
(same ``noise``, norm-pix on and off), SimMIM =
``ViTForMaskedImageModeling`` (same ``bool_masked_pos``), VideoMAE (below), BERT MLM = ``BertForMaskedLM`` (same
corrupted inputs and labels), FLIP's contrastive loss and logit-scale gradient = CLIP's loss in
transformers, and optimizer steps of the MAE recipe (``torch.optim.AdamW`` with the official parameter
groups, schedule re-derived from facebookresearch/mae ``util/lr_sched.py``), of the VideoMAE recipe
(torch's AdamW with MCG-NJU/VideoMAE ``optim_factory.py``'s groups and ``utils.py::cosine_scheduler``)
and of the BERT recipe (a
NumPy transcription of google-research/bert ``optimization.py``: its groups, schedule, epsilon,
clipping and Adam without bias correction; torch's AdamW always corrects).

VideoMAE = ``VideoMAEForPreTraining`` (same ``bool_masked_pos``, per-channel targets) for a run laid out
as VideoMAE's (``model.pos_embed='sincos_1d'``, no cls token, ``decoder.embed_bias=False``: the
VideoMAE recipes). Its per-patch mode (MAE-ST) has no transformers peer; MAE's per-patch targets are
the ViTMAE comparison above.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import load_config, perturbed_setup as _setup, random_images, text_batch as _text_batch, to_torch_images
from maskjax import step as step_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOSS_RTOL = 1e-5
GRAD_TOL = 1e-4


def _hf(config, params, arch, cls, path):
    from maskjax import export

    export.export(config, params, "hf", str(path), arch)
    return cls.from_pretrained(str(path)).eval()


def _torch_grads(model) -> dict:
    from maskjax import export

    return {export.canonical(n): p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def _compared_names(config, arch, tensors) -> list:
    """Tensor names that hold maskjax parameters (not the fixed position tables or BERT's unused
    token-type table, which maskjax writes as constants)."""
    from maskjax import export

    fixed = set(export.position_tables(config, arch, "" if arch == "vit" else "vit."))
    fixed.add("bert.embeddings.token_type_embeddings.weight")
    return [name for name in tensors if name not in fixed]


def _assert_close(name, ours, theirs, tol=GRAD_TOL):
    # Relative to the tensor's largest entry, with a floor for gradients that are zero in exact
    # arithmetic and float32 rounding noise (~1e-9) in both implementations (e.g. the key bias).
    scale = max(float(np.max(np.abs(theirs))), 1e-4)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale, err_msg=name)


def _assert_grads_match(config, arch, grads, model):
    from maskjax import export

    ours = export.to_tensors(config, jax.tree.map(np.asarray, grads), arch)
    theirs = _torch_grads(model)
    names = _compared_names(config, arch, ours)
    missing = [n for n in names if n not in theirs]
    assert not missing, f"transformers has no gradient for {missing}"
    for name in names:
        _assert_close(name, ours[name], theirs[name])
    return len(names)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("norm_pix,scan_layers", [(True, True), (False, True), (True, False)])
def test_mae_loss_and_gradients_match_vitmae(tmp_path, norm_pix, scan_layers):
    from maskjax import masking

    config = load_config("mae_digits.py:tiny", "model.qkv_bias=True", f"loss.norm_pix={norm_pix}",
                         "data.channels=3", f"model.scan_layers={scan_layers}")
    objective, graphdef, params = _setup(config)
    images = random_images(config)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros(len(images), jnp.int32)}
    patches = objective.patches(batch)
    noise = np.random.default_rng(1).uniform(size=patches.shape[:2]).astype(np.float32)
    mask = masking.from_keep_order(jnp.argsort(jnp.asarray(noise), axis=1), objective.num_kept)

    def loss_fn(p):
        return objective.masked_loss(nnx.merge(graphdef, p), batch, patches, mask)[0]

    loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(jnp.asarray, params))

    hf = _hf(config, params, "vit_mae", transformers.ViTMAEForPreTraining, tmp_path / "mae")
    assert hf.config.norm_pix_loss == norm_pix
    out = hf(pixel_values=to_torch_images(images), noise=torch.from_numpy(noise))
    out.loss.backward()
    np.testing.assert_array_equal(out.mask.numpy().astype(bool), np.asarray(mask.mask))
    assert float(loss) == pytest.approx(out.loss.item(), rel=LOSS_RTOL)
    assert _assert_grads_match(config, "vit_mae", grads, hf) > 30


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_videomae_loss_and_gradients_match_videomae_for_pretraining(tmp_path, qkv_bias):
    """The recipe's layout (1D sinusoid positions, no cls token, encoder_to_decoder without bias,
    VideoMAE's per-channel-in-tubelet targets) is VideoMAE's: loss and every gradient equal
    transformers' ``VideoMAEForPreTraining`` on the same tube mask. One channel: transformers
    un-normalises 3-channel clips with ImageNet's statistics before taking targets, which changes only
    the epsilon of the standardisation."""
    config = load_config("videomae_digits.py:tiny", f"model.qkv_bias={qkv_bias}")
    objective, graphdef, params = _setup(config)
    rng = np.random.default_rng(2)
    d = config.data
    clips = rng.normal(size=(3, d.frames, d.image_size, d.image_size, d.channels)).astype(np.float32)
    batch = {"image": jnp.asarray(clips), "label": jnp.zeros(len(clips), jnp.int32)}
    patches = objective.patches(batch)
    mask = objective.draw_mask(jax.random.split(jax.random.key(4), len(clips)))

    def loss_fn(p):
        return objective.masked_loss(nnx.merge(graphdef, p), batch, patches, mask)[0]

    loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(jnp.asarray, params))

    hf = _hf(config, params, "videomae", transformers.VideoMAEForPreTraining, tmp_path / "videomae")
    assert hf.config.qv_bias == qkv_bias and not hf.config.use_mean_pooling
    hf.decoder.norm.eps = config.model.norm_eps  # transformers fixes 1e-5 there; VideoMAE's own code uses 1e-6
    pixels = torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 1, 4, 2, 3)))  # [B, T, C, H, W]
    out = hf(pixel_values=pixels, bool_masked_pos=torch.from_numpy(np.array(mask.mask)))
    out.loss.backward()
    assert float(loss) == pytest.approx(out.loss.item(), rel=LOSS_RTOL)
    assert _assert_grads_match(config, "videomae", grads, hf) > 20


def test_simmim_loss_and_gradients_match_vit_for_masked_image_modeling(tmp_path):
    config = load_config("simmim_digits.py:tiny", "model.qkv_bias=True")
    objective, graphdef, params = _setup(config, seed=2)
    images = random_images(config, seed=2)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros(len(images), jnp.int32)}
    patches = objective.patches(batch)
    hidden = objective.masker()(jax.random.key(3), patches.shape[0]).mask

    def loss_fn(p):
        return objective.masked_loss(nnx.merge(graphdef, p), batch, patches, hidden)[0]

    loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(jnp.asarray, params))
    hf = _hf(config, params, "vit_mim", transformers.ViTForMaskedImageModeling, tmp_path / "simmim")
    out = hf(pixel_values=to_torch_images(images), bool_masked_pos=torch.from_numpy(np.asarray(hidden)))
    out.loss.backward()
    # transformers divides by (masked pixels + 1e-5): a relative difference of about 1e-5 / masked pixels
    assert float(loss) == pytest.approx(out.loss.item(), rel=LOSS_RTOL)
    assert _assert_grads_match(config, "vit_mim", grads, hf) > 10


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("kind,scan_layers", [("token", True), ("word", True), ("token", False)])
def test_bert_mlm_loss_and_gradients_match_bert_for_masked_lm(tmp_path, data_dir, kind, scan_layers):
    config = load_config("mlm_text.py:tiny", "model.qkv_bias=True", "model.norm_eps=1e-12", f"mask.kind={kind}",
                         f"model.scan_layers={scan_layers}", data_dir=data_dir)
    objective, graphdef, params = _setup(config, seed=4)
    batch = jax.tree.map(jnp.asarray, _text_batch(objective))
    key = jax.random.key(6)
    inputs, selected = objective.corrupt(batch, key, 0)
    assert int(selected.sum()) > 0 and bool((inputs != batch["tokens"]).any())

    def loss_fn(p):
        return objective.loss(nnx.merge(graphdef, p), batch, key, 0)[0]

    loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(jnp.asarray, params))
    hf = _hf(config, params, "bert", transformers.BertForMaskedLM, tmp_path / "bert")
    labels = np.where(np.asarray(selected), np.asarray(batch["tokens"]), -100).astype(np.int64)
    out = hf(input_ids=torch.from_numpy(np.asarray(inputs, np.int64)), labels=torch.from_numpy(labels))
    out.loss.backward()
    assert float(loss) == pytest.approx(out.loss.item(), rel=LOSS_RTOL)
    assert _assert_grads_match(config, "bert", grads, hf) > 10


# --------------------------------------------------------------------------- FLIP


def test_flip_contrastive_loss_and_logit_scale_gradient_match_clip():
    from transformers.models.clip import modeling_clip

    from maskjax.objectives import flip

    rng = np.random.default_rng(7)
    image, text = rng.normal(size=(2, 16, 8)).astype(np.float32)
    config = load_config("flip_laion.py:vit_b16")
    log_scale = math.log(1.0 / config.flip.init_temperature)

    def ours(image, text, log_scale):
        scale = flip.clipped_logit_scale(log_scale, config.flip.max_logit_scale)
        return flip.contrastive_loss(flip.normalize(image), flip.normalize(text), scale)[0]

    loss, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(jnp.asarray(image), jnp.asarray(text),
                                                               jnp.float32(log_scale))
    t_image, t_text = (torch.from_numpy(x).requires_grad_() for x in (image, text))
    t_scale = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)
    logits_per_text = norm(t_text) @ norm(t_image).T * t_scale.exp()  # CLIPModel.forward
    reference = modeling_clip.image_text_contrastive_loss(logits_per_text)
    reference.backward()
    assert float(loss) == pytest.approx(reference.item(), rel=LOSS_RTOL)
    for name, a, b in zip(("image", "text", "log_scale"), grads, (t_image.grad, t_text.grad, t_scale.grad)):
        _assert_close(name, np.asarray(a), b.numpy())
    # The recipe's temperature learns from step 0: its start lies inside the clip.
    assert abs(float(grads[2])) > 1e-4


def test_flip_logit_scale_stops_learning_only_at_the_clip():
    from maskjax.objectives import flip

    rng = np.random.default_rng(8)
    image, text = (flip.normalize(jnp.asarray(x)) for x in rng.normal(size=(2, 16, 8)).astype(np.float32))
    grad = lambda s: float(jax.grad(lambda v: flip.contrastive_loss(image, text, flip.clipped_logit_scale(v, 100.0))[0])(
        jnp.float32(s)))
    assert grad(math.log(1 / 0.07)) != 0.0
    assert grad(math.log(100.0) + 0.1) == 0.0 and grad(-0.1) == 0.0


# --------------------------------------------------------------------------- optimizer steps


def _mae_lr(step, peak, warmup, total, min_lr=0.0):
    """facebookresearch/mae util/lr_sched.py per iteration: linear warm-up, then half-cycle cosine."""
    if step < warmup:
        return peak * step / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _bert_lr(step, peak, warmup, total):
    """google-research/bert optimization.py: polynomial (power 1) decay of the global step to 0 over
    all steps; during warm-up the linear warm-up value replaces it."""
    if step < warmup:
        return peak * step / warmup
    return peak * (1.0 - min(step, total) / total)


def _mae_no_decay(name, param):
    """MAE's param groups (timm's add_weight_decay: 1-D tensors and biases) plus the cls/mask tokens
    and position tables (see the recipe docstring for why tokens are excluded)."""
    tokens = ("cls_token", "mask_token", "position_embeddings", "decoder_pos_embed")
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith(tokens)


def _bert_no_decay(name, param):
    """google-research/bert optimization.py: exclude_from_weight_decay = LayerNorm, layer_norm, bias."""
    return any(part in name for part in ("LayerNorm", "layer_norm", "bias"))


@pytest.mark.parametrize("max_norm", [0.5, 50.0])  # the gradients' norm is ~8: clipped, then not
def test_global_norm_clipping_matches_torch_and_optax(max_norm):
    rng = np.random.default_rng(3)
    grads = {"w": rng.standard_normal((16, 24)).astype(np.float32), "b": rng.standard_normal(24).astype(np.float32)}
    clip = step_lib.clip_by_global_norm(max_norm)
    state = clip.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(optax.clip_by_global_norm(max_norm).init(grads))
    ours, _ = clip.update(jax.tree.map(jnp.asarray, grads), state)
    given, _ = clip.update(jax.tree.map(jnp.asarray, grads), state, grad_norm=optax.tree.norm(grads))
    reference, _ = optax.clip_by_global_norm(max_norm).update(jax.tree.map(jnp.asarray, grads), state)
    tensors = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in grads.items()}
    for k, t in tensors.items():
        t.grad = torch.from_numpy(grads[k].copy())
    torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
    for k in grads:
        np.testing.assert_allclose(ours[k], tensors[k].grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(ours[k], reference[k], rtol=1e-6, atol=1e-8, err_msg=k)
        np.testing.assert_array_equal(given[k], ours[k])
    if max_norm > 8.0:  # below the threshold the gradients pass unchanged, bit for bit
        for k in grads:
            np.testing.assert_array_equal(ours[k], grads[k])
    else:
        assert float(optax.tree.norm(ours)) == pytest.approx(max_norm, rel=1e-5)
        # the norm handed in is the one used (the trainer's, computed once for its metrics)
        halved, _ = clip.update(jax.tree.map(jnp.asarray, grads), state, grad_norm=2 * optax.tree.norm(grads))
        np.testing.assert_allclose(halved["w"], ours["w"] / 2, rtol=1e-6)


class TorchAdamW:
    """torch.optim.AdamW over transformers' parameters, in the official groups."""

    def __init__(self, model, no_decay, o):
        from maskjax import export

        named = [(export.canonical(n), p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if not no_decay(n, p)]
        plain = [p for n, p in named if no_decay(n, p)]
        self.model, self.clip = model, o.clip_norm
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": plain, "weight_decay": 0.0}], lr=0.0, betas=(o.b1, o.b2), eps=o.eps)

    def step(self, grads: dict, lr: float):
        from maskjax import export

        self.model.zero_grad(set_to_none=True)
        for name, p in self.model.named_parameters():
            if export.canonical(name) in grads:
                p.grad = torch.from_numpy(grads[export.canonical(name)].copy())
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.clip)
        self.opt.step()

    def params(self) -> dict:
        from maskjax import export

        return {export.canonical(n): p.detach().numpy() for n, p in self.model.named_parameters()}


class BertAdamWeightDecay:
    """google-research/bert ``optimization.py`` transcribed in NumPy (float64): clip the gradients by
    their global norm, m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, update = m / (sqrt(v) + eps)
    plus weight_decay * param unless the name contains LayerNorm / layer_norm / bias, param -= lr *
    update. No bias correction."""

    def __init__(self, model, no_decay, o):
        from maskjax import export

        self.values = {export.canonical(n): p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
        self.no_decay, self.o = no_decay, o
        self.m = {n: np.zeros_like(v) for n, v in self.values.items()}
        self.v = {n: np.zeros_like(v) for n, v in self.values.items()}

    def step(self, grads: dict, lr: float):
        o = self.o
        norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
        scale = o.clip_norm / max(norm, o.clip_norm) if o.clip_norm > 0 else 1.0
        for name, g in grads.items():
            g = g.astype(np.float64) * scale
            self.m[name] = o.b1 * self.m[name] + (1 - o.b1) * g
            self.v[name] = o.b2 * self.v[name] + (1 - o.b2) * g * g
            update = self.m[name] / (np.sqrt(self.v[name]) + o.eps)
            if not self.no_decay(name, self.values[name]):
                update = update + o.weight_decay * self.values[name]
            self.values[name] = self.values[name] - lr * update

    def params(self) -> dict:
        return self.values


def _adamw_steps(tmp_path, config, arch, cls, no_decay, lr_fn, steps, reference=TorchAdamW):
    """Runs ``steps`` updates with the same random gradients in maskjax (the trainer's optimizer) and
    in ``reference``; returns both parameter sets in transformers' layout."""
    from maskjax import export
    from maskjax.models import layers

    objective, graphdef, params = _setup(config, seed=9)
    _, state = nnx.split(objective.build(nnx.Rngs(0)))
    optimizer, schedule = step_lib.make_optimizer(config, layers.param_roles(state))
    ref = reference(_hf(config, params, arch, cls, tmp_path / arch), no_decay, config.optim)
    ours = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(ours)
    rng = np.random.default_rng(10)
    for step in range(steps):
        grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1, params)
        assert float(schedule(step)) == pytest.approx(lr_fn(step), rel=1e-5, abs=1e-12), step
        grads_in = jax.tree.map(jnp.asarray, grads)  # the trainer passes the norm it logs to the clipping
        updates, opt_state = optimizer.update(grads_in, opt_state, ours, grad_norm=optax.tree.norm(grads_in))
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
        tensors = export.to_tensors(config, grads, arch)
        ref.step({name: tensors[name] for name in _compared_names(config, arch, tensors)}, lr_fn(step))
    mine = export.to_tensors(config, jax.tree.map(np.asarray, ours), arch)
    return mine, ref.params(), _compared_names(config, arch, mine)


def test_mae_recipe_adamw_steps_match_torch(tmp_path):
    config = load_config("mae_imagenet.py:vit_b16", "data.image_size=16", "model.patch_size=4", "model.width=32",
                         "model.depth=1", "model.heads=2", "decoder.width=16", "decoder.depth=1", "decoder.heads=2",
                         "batch_size=256", "total_steps=10", "optim.warmup_steps=3")
    assert config.optim.base_lr == 1.5e-4
    config.optim.base_lr = 1e-2  # large enough that a wrong decay group shows within six steps
    total, warmup, peak = config.total_steps, config.optim.warmup_steps, config.optim.base_lr
    mine, theirs, names = _adamw_steps(tmp_path, config, "vit_mae", transformers.ViTMAEForPreTraining,
                                       _mae_no_decay, lambda s: _mae_lr(s, peak, warmup, total), steps=6)
    for name in names:
        _assert_close(name, mine[name], theirs[name])


def _videomae_lr(step, peak, warmup, total, final):
    """MCG-NJU/VideoMAE utils.py cosine_scheduler per iteration: np.linspace(0, peak, warmup) (the peak
    at the last warm-up step), then final + (peak - final) (1 + cos(pi i / (total - warmup))) / 2."""
    if step < warmup:
        return float(np.linspace(0.0, peak, warmup)[step])
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _videomae_no_decay(name, param):
    """MCG-NJU/VideoMAE optim_factory.get_parameter_groups: 1-D tensors, biases and the model's
    no_weight_decay() names (mask_token; its position tables are not parameters)."""
    return param.ndim == 1 or name.endswith(".bias") or name == "mask_token"


def test_videomae_recipe_adamw_steps_match_torch(tmp_path):
    config = load_config("videomae_k400.py:vit_b", "data.image_size=16", "data.frames=4", "model.patch_size=4",
                         "model.width=32", "model.depth=1", "model.heads=2", "decoder.width=16", "decoder.depth=1",
                         "decoder.heads=2", "model.dtype=float32", "data.channels=1", "batch_size=256",
                         "total_steps=10", "optim.warmup_steps=4")
    o = config.optim
    assert o.base_lr == pytest.approx(1.5e-4) and o.base_batch == 256
    o.base_lr = 1e-2  # large enough that a wrong decay group shows within seven steps; min lr keeps its ratio
    peak, total, warmup = o.base_lr, config.total_steps, o.warmup_steps
    lr = lambda s: _videomae_lr(s, peak, warmup, total, 1e-2 * 1e-5 / 1.5e-4)
    mine, theirs, names = _adamw_steps(tmp_path, config, "videomae", transformers.VideoMAEForPreTraining,
                                       _videomae_no_decay, lr, steps=7)
    for name in names:
        _assert_close(name, mine[name], theirs[name])


def _flip_decays(path: tuple) -> bool:
    """facebookresearch/flip utils/opt_util.py as t5x/train_state_initializer.py combines them:
    filter_bias_and_norm (the last name is 'bias' or 'scale') and filter_posembed ('pos_embedding' in
    the name), written for maskjax's names (an attention output bias is 'out_bias', a position table
    'pos_embed')."""
    return not (path[-1].endswith("bias") or path[-1] == "scale" or any("pos_embed" in p for p in path))


def test_flip_recipe_adamw_steps_match_flips_optimizer(data_dir):
    """FLIP has no transformers peer, so the reference is optax's adamw as FLIP calls it, transcribed in
    NumPy (float64; bias-corrected moments, eps 1e-8, decoupled decay under FLIP's filter) with FLIP's
    create_learning_rate_fn (linear warm-up from warmup_abs_lr = 0, cosine to min_abs_lr = 0)."""
    from maskjax.models import layers

    recipe = load_config("flip_laion.py:vit_b16")
    config = load_config("flip_digits.py:tiny", data_dir=data_dir)
    config.optim = recipe.optim
    config.update(batch_size=256, total_steps=10)
    assert config.optim.base_lr == 4e-6
    # The recipe's rule and schedule shape at a learning rate where weight decay moves a parameter by
    # more than the tolerance in six steps (at 4e-6 x 0.2 it would pass with any decay rule).
    config.optim.update(warmup_steps=3, base_lr=1e-2)
    o = config.optim
    peak, warmup, total = o.base_lr, o.warmup_steps, config.total_steps

    def lr(step):
        if step < warmup:
            return peak * step / warmup
        return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    objective, graphdef, params = _setup(config, seed=9)
    _, state = nnx.split(objective.build(nnx.Rngs(0)))
    optimizer, schedule = step_lib.make_optimizer(config, layers.param_roles(state))
    flat = {tuple(str(k.key) for k in path): np.asarray(v, np.float64)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    decays = {path: _flip_decays(path) for path in flat}
    assert decays[("log_scale",)] and decays[("text", "token_embed")] and decays[("image", "cls")]
    assert not decays[("text", "pos_embed")] and not decays[("image", "norm", "scale")]
    mu = {k: np.zeros_like(v) for k, v in flat.items()}
    nu = {k: np.zeros_like(v) for k, v in flat.items()}
    ours = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(ours)
    rng = np.random.default_rng(10)
    for step in range(6):
        grads = jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(np.float32) * 0.1, params)
        assert float(schedule(step)) == pytest.approx(lr(step), rel=1e-5, abs=1e-12), step
        updates, opt_state = optimizer.update(jax.tree.map(jnp.asarray, grads), opt_state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            k = tuple(str(e.key) for e in path)
            g = np.asarray(g, np.float64)
            mu[k] = o.b1 * mu[k] + (1 - o.b1) * g
            nu[k] = o.b2 * nu[k] + (1 - o.b2) * g * g
            t = step + 1
            update = (mu[k] / (1 - o.b1 ** t)) / (np.sqrt(nu[k] / (1 - o.b2 ** t)) + o.eps)
            if decays[k]:
                update = update + o.weight_decay * flat[k]
            flat[k] = flat[k] - lr(step) * update
    for path, value in jax.tree_util.tree_flatten_with_path(ours)[0]:
        k = tuple(str(e.key) for e in path)
        _assert_close("/".join(k), np.asarray(value), flat[k])


def test_bert_recipe_adam_weight_decay_steps_match_bert_optimizer(tmp_path, data_dir):
    config = load_config("bert_base.py:128", "data.name=maskjax_text", "data.train_split=train",
                         "data.eval_split=validation", "data.seq_len=32", "model.width=32", "model.depth=1",
                         "model.heads=2", "model.max_len=32", "mlm.max_predictions=8", "total_steps=10",
                         "optim.warmup_steps=3", "optim.clip_norm=0.05", data_dir=data_dir)
    assert config.optim.bias_correction is False and config.optim.eps == 1e-6 and config.optim.base_lr == 1e-4
    config.optim.base_lr = 5e-2  # at 1e-4 x weight decay 0.01 a wrong decay group would not show in six steps
    total, warmup, peak = config.total_steps, config.optim.warmup_steps, config.optim.base_lr
    mine, theirs, names = _adamw_steps(tmp_path, config, "bert", transformers.BertForMaskedLM, _bert_no_decay,
                                       lambda s: _bert_lr(s, peak, warmup, total), steps=6,
                                       reference=BertAdamWeightDecay)
    for name in names:
        _assert_close(name, mine[name], theirs[name])
