"""FLIP (global-batch contrastive loss, text masking, zero-shot), video MAE (moving digits, tube and
dual masking, PNG strips), HOG targets, hard-patch mining, and their bad inputs."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import step as step_lib
from maskjax import config as config_lib
from maskjax import masking, objectives, train
from maskjax.data import DataError, pipeline, sources
from maskjax.data import digits as digits_data
from maskjax.objectives import base, flip, mae, vision
from tests.conftest import load_config

# --------------------------------------------------------------------------- FLIP


def flip_batch(setup, seed=0):
    spec = setup.objective.batch_spec()
    rng = np.random.default_rng(seed)
    tok = setup.objective.tokenizer
    text = rng.integers(5, tok.vocab_size, size=spec["text"][0]).astype(np.int32)
    text[:, 0], text[:, -1] = tok.cls_id, tok.sep_id
    text[::3, 6:] = tok.pad_id  # some short captions
    text[::3, 5] = tok.sep_id
    return {"image": rng.normal(size=spec["image"][0]).astype(np.float32),
            "label": np.zeros(spec["label"][0], np.int32), "text": text}


def test_contrastive_loss_is_over_the_global_batch(data_dir):
    """8 devices give the loss of one device on the same global batch, and not the mean of the
    per-device losses (which would only contrast within a device)."""
    config = load_config("flip_digits.py:tiny", "mask.ratio=0.5", data_dir=data_dir)
    one = step_lib.build(config, devices=jax.devices()[:1])
    eight = step_lib.build(config, devices=jax.devices())
    batch = flip_batch(one)
    _, m1 = one.step_fn(one.init_fn(), one.global_batch(batch))
    _, m8 = eight.step_fn(eight.init_fn(), eight.global_batch(batch))
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)

    # The same embeddings contrasted within 4-example shards give a clearly different loss.
    rng = np.random.default_rng(1)
    image = flip.normalize(jnp.asarray(rng.normal(size=(32, 16))))
    text = flip.normalize(jnp.asarray(rng.normal(size=(32, 16))) + image)
    whole, _ = flip.contrastive_loss(image, text, jnp.float32(10.0))
    shards = np.mean([float(flip.contrastive_loss(image[i:i + 4], text[i:i + 4], jnp.float32(10.0))[0])
                      for i in range(0, 32, 4)])
    assert abs(float(whole) - shards) > 0.1


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    image = np.asarray(flip.normalize(jnp.asarray(rng.normal(size=(6, 5)))))
    text = np.asarray(flip.normalize(jnp.asarray(rng.normal(size=(6, 5)))))
    logits = 7.0 * image @ text.T

    def ce(m):
        m = m - m.max(1, keepdims=True)
        return -np.mean(np.diag(m) - np.log(np.exp(m).sum(1)))

    loss, accuracy = flip.contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(7.0))
    assert float(loss) == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-5)
    assert float(accuracy) == pytest.approx(np.mean(logits.argmax(1) == np.arange(6)))


def test_text_masking_drops_words_and_keeps_positions(data_dir):
    config = load_config("flip_digits.py:tiny", data_dir=data_dir)
    tok = objectives.get(config).tokenizer
    tokens = jnp.asarray(pipeline.caption_tokens(tok, ["a scan of a handwritten seven.", "a one."], 16))
    out, segments, positions = flip.drop_text_tokens(jax.random.split(jax.random.key(0), 2), tokens, tok, 0.5)
    assert out.shape == (2, 16 - 7)  # 16 - floor(0.5 * 14)
    for row in range(2):
        real = np.asarray(tokens[row] != tok.pad_id)
        eligible = int(real.sum()) - 2
        kept = np.asarray(segments[row]).astype(bool)
        assert kept.sum() == real.sum() - eligible // 2
        # kept tokens are the original tokens at their original positions, [CLS] first
        np.testing.assert_array_equal(np.asarray(out[row])[kept], np.asarray(tokens[row])[np.asarray(positions[row])[kept]])
        assert int(out[row, 0]) == tok.cls_id and tok.sep_id in np.asarray(out[row])[kept]


def _recomputed_zero_shot(config, params) -> float:
    """Zero-shot accuracy outside the evaluator: the whole eval split in one batch, each prompt through
    the text tower alone, class embeddings averaged and normalised, and the argmax in NumPy."""
    from maskjax import evaluate, sharding

    setup = step_lib.build(config)
    objective = setup.objective
    model = nnx.merge(setup.graphdef, jax.tree.map(np.asarray, jax.device_get(params)))
    size = len(sources.builder(config.data).as_data_source(config.data.eval_split))
    (images, real), = list(pipeline.eval_batches(config, config.data.eval_split, size))
    assert real == size
    names = evaluate.class_names(config)
    with sharding.activation_mesh(None):
        classes = []
        for name in names:
            prompts = [template.format(name) for template in config.eval.prompts]
            tokens = jnp.asarray(pipeline.caption_tokens(objective.tokenizer, prompts, config.data.seq_len))
            emb = np.asarray(model.embed_text(*flip.drop_text_tokens(None, tokens, objective.tokenizer, 0.0)))
            mean = emb.mean(axis=0)
            classes.append(mean / np.linalg.norm(mean))
        image = np.asarray(model.embed_image(objective.patches({"image": jnp.asarray(images["image"])})))
    predicted = np.argmax(image @ np.stack(classes).T, axis=1)
    return float(np.mean(predicted == images["label"]))


@pytest.mark.library_paths
def test_captioned_digits_and_flip_train_with_zero_shot_eval(data_dir, tmp_path):
    b = sources.builder(load_config("flip_digits.py", data_dir=data_dir).data)
    assert b.info.features["label"].names == list(digits_data.CLASS_NAMES)
    record = b.as_data_source("train")[0]
    assert digits_data.CLASS_NAMES[record["label"]] in record["caption"].decode()

    config = load_config("flip_digits.py:tiny,textmask", data_dir=data_dir)
    summary = train.train(config, str(tmp_path), quiet=True)
    zero_shot = summary["eval"]["zero_shot"]
    assert zero_shot["num_classes"] == 10 and zero_shot["num_examples"] == 360
    assert zero_shot["chance"] == pytest.approx(0.1)
    assert zero_shot["accuracy"] == pytest.approx(_recomputed_zero_shot(config, summary["state"]["params"]), abs=1e-9)
    assert "pretrained" in summary["eval"]  # the image tower is probed like any encoder
    assert json.load(open(tmp_path / "eval.json"))["zero_shot"] == zero_shot


# --------------------------------------------------------------------------- video


def test_moving_digits_clips_and_video_preprocessing(data_dir):
    config = load_config("videomae_digits.py", data_dir=data_dir)
    src = sources.source(config.data, "train")
    clip = src[0]["video"]
    assert clip.shape == (16, 32, 32, 1) and clip.dtype == np.uint8
    assert (clip.reshape(16, -1).sum(1) == clip[0].sum()).all()  # the whole digit is on every frame
    assert not np.array_equal(clip[0], clip[1])  # and it moves
    digit = np.full((16, 16), 200, np.uint8)
    np.testing.assert_array_equal(digits_data.moving_clip(digit, 3), digits_data.moving_clip(digit, 3))
    assert not np.array_equal(digits_data.moving_clip(digit, 3), digits_data.moving_clip(digit, 4))
    # eval: the centred window of 4 frames 2 apart (frames 4, 6, 8, 10), no crop at full size
    out = pipeline.Preprocess(config.data, train=False, seed=0)((0, 0, src[0]))["image"]
    np.testing.assert_allclose(out, (clip[4:11:2].astype(np.float32) / 255.0 - 0.5) / 0.5, atol=1e-6)
    batch = next(pipeline.train_loader(config))
    assert batch["image"].shape == (16, 4, 32, 32, 1)


def test_running_cell_decoder_mask():
    m = masking.running_cell_mask(jax.random.key(0), 3, 4, (4, 4), 0.5)
    mask = np.asarray(m.mask).reshape(3, 4, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(3, 4, 4, 4)
    assert (mask.sum(-1) == 2).all()  # every 2x2 cell of every frame hides exactly 2 tokens
    assert (mask[:, 1:] != mask[:, :-1]).any(-1).all()  # the pattern moves from frame to frame
    assert m.num_kept == 32


def test_dual_masking_loss_only_on_encoder_masked_decoder_kept(data_dir):
    config = load_config("videomae_digits.py:tiny,dual", data_dir=data_dir)
    objective = objectives.get(config)
    objective.validate()
    model = objective.build(nnx.Rngs(0))
    spec = objective.batch_spec()
    batch = {"image": jax.random.normal(jax.random.key(1), spec["image"][0]), "label": jnp.zeros(8, jnp.int32)}
    key = jax.random.key(2)
    target_shape = (8, objective.num_tokens, objective.target_dim)

    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def loss_of(target, params):
        objective.targets = lambda *args, **kwargs: target
        return objective.loss(nnx.merge(graphdef, params), batch, key, 0)[0]

    grad = np.asarray(jax.grad(loss_of)(jnp.zeros(target_shape), params))
    del objective.targets
    enc_keys, dec_keys = masking.split_rows(base.example_keys(key, batch))
    hidden = np.asarray(objective.draw_mask(enc_keys).mask)
    decoder_dropped = np.asarray(masking.per_example(objective.decoding.masker(), dec_keys).mask)
    expected = hidden & ~decoder_dropped
    assert expected.any() and (~expected).any()
    np.testing.assert_array_equal(np.abs(grad).sum(-1) > 0, expected)


@pytest.mark.library_paths
def test_videomae_trains_and_writes_a_frame_strip(data_dir, tmp_path):
    config = load_config("videomae_digits.py:tiny", "total_steps=12", "optim.base_lr=0.005", data_dir=data_dir)
    summary = train.train(config, str(tmp_path), quiet=True)
    assert summary["losses"][-1][1] < summary["losses"][0][1]
    pngs = glob.glob(str(tmp_path / "reconstructions" / "*.png"))
    assert len(pngs) == 1
    from PIL import Image

    strip = np.asarray(Image.open(pngs[0]))
    # 4 clips x 3 rows (input, masked, reconstruction) of 4 frames, 16 px x 8 enlarged + 2 px gaps
    assert strip.shape[:2] == (12 * 130 + 2, 4 * 130 + 2)


# --------------------------------------------------------------------------- HOG


def hog_reference(image: np.ndarray, cell: int, bins: int) -> np.ndarray:
    """Straight loops over pixels: Sobel, unsigned orientation bins, cell histograms, L2 norm."""
    h, w, c = image.shape
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)
    out = np.zeros((h // cell, w // cell, c, bins))
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                window = padded[y:y + 3, x:x + 3, ch]
                gx, gy = (window * kx).sum(), (window * kx.T).sum()
                b = int(np.floor(np.arctan2(gx, gy) / np.pi * bins)) % bins
                out[y // cell, x // cell, ch, b] += np.hypot(gx, gy)
    norm = np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return (out / norm).reshape(h // cell, w // cell, c * bins)


def test_hog_matches_numpy_and_is_zero_on_constant_images():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    got = np.asarray(vision.hog(jnp.asarray(images), cell=8, bins=9))
    assert got.shape == (2, 2, 2, 27)
    for i in range(2):
        np.testing.assert_allclose(got[i], hog_reference(images[i], 8, 9), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(vision.hog(jnp.full((1, 16, 16, 3), 0.7), 8, 9)), 0.0)


@pytest.mark.parametrize("name", ["mae_digits.py:tiny", "simmim_digits.py:tiny"])
def test_hog_targets_train(name):
    config = load_config(name, "loss.target=hog", "loss.hog_cell=2", "optim.base_lr=0.01",
                         "optim.warmup_steps=0", "optim.schedule=constant")
    setup = step_lib.build(config)
    assert setup.objective.target_dim == 4 * 9  # 2x2 cells of one channel per 4-pixel patch
    rng = np.random.default_rng(0)
    batch = setup.global_batch({"image": rng.normal(size=(32, 16, 16, 1)).astype(np.float32),
                                "label": np.zeros(32, np.int32)})
    state = setup.init_fn()
    losses = []
    for _ in range(10):
        state, m = setup.step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# --------------------------------------------------------------------------- HPM


def test_hard_patch_mask_takes_the_hardest_then_random():
    scores = jax.random.normal(jax.random.key(0), (4, 16))
    m = masking.hard_patch_mask(jax.random.key(1), scores, num_masked=12, hard_count=5)
    mask, order = np.asarray(m.mask), np.argsort(-np.asarray(scores), axis=1)
    assert (mask.sum(1) == 12).all() and m.num_kept == 4
    assert all(mask[b, order[b, :5]].all() for b in range(4))


def test_hpm_hard_share_follows_its_schedule():
    """int(masked * final_share * (step + 1) / T) of the hidden patches are the hardest by the EMA model's
    loss predictor (the teacher passed in), not the student's."""
    config = load_config("mae_digits.py:tiny", "hpm.enabled=true", "hpm.final_share=0.5", "total_steps=100")
    objective = objectives.get(config)
    objective.validate()
    masked = objective.num_tokens - objective.num_kept  # 12 of 16
    hpm = objective.masks
    counts = [int(hpm.hard_count(s)) for s in (0, 25, 50, 99, 200)]
    assert counts == [0, int(masked * 0.5 * 26 / 100), int(masked * 0.5 * 51 / 100), 6, 6]
    model, teacher = objective.build(nnx.Rngs(0)), objective.teacher().build(nnx.Rngs(7))
    batch = {"image": jax.random.normal(jax.random.key(1), (4, 16, 16, 1)), "label": jnp.zeros(4, jnp.int32)}
    patches = objective.patches(batch)
    scores = np.asarray(hpm.predicted_difficulty(teacher, patches))
    student_scores = np.asarray(hpm.predicted_difficulty(model, patches))
    assert not np.allclose(scores, student_scores)
    m = hpm.draw(model, patches, base.example_keys(jax.random.key(2), batch), 100, teacher)
    hardest = np.argsort(-scores, axis=1)[:, :6]
    assert all(np.asarray(m.mask)[b, hardest[b]].all() for b in range(4))
    loss, metrics = objective.loss(model, batch, jax.random.key(2), jnp.int32(100), teacher)
    assert float(metrics["hard_count"]) == 6 and float(metrics["loss_prediction"]) > 0
    assert float(loss) == pytest.approx(float(metrics["reconstruction_loss"] + metrics["loss_prediction"]), rel=1e-5)


def test_hpm_rank_loss_equals_the_official_relative_loss_with_ties_left_out():
    """``pairwise_rank_loss`` against HPM's ``forward_learning_loss(relative=True)`` written with torch
    (including its log(sigmoid + 1e-6)), on losses with ties."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 12)).astype(np.float32)
    actual = rng.integers(0, 4, size=(3, 12)).astype(np.float32)  # many ties
    p, t = torch.from_numpy(pred), torch.from_numpy(actual)
    positive = t.unsqueeze(1) > t.unsqueeze(2)
    negative = t.unsqueeze(1) < t.unsqueeze(2)
    matrix = p.unsqueeze(1) - p.unsqueeze(2)
    official = (-(positive.int() * torch.log(torch.sigmoid(matrix) + 1e-6))
                - negative.int() * torch.log(1 - torch.sigmoid(matrix) + 1e-6)).sum() / (positive | negative).sum()
    ours = mae.pairwise_rank_loss(jnp.asarray(pred), jnp.asarray(actual), jnp.ones((3, 12), bool))
    assert float(ours) == pytest.approx(float(official), rel=1e-4)


def test_hpm_is_trained_with_its_ema_model_as_the_teacher(data_dir):
    """The EMA teacher is the whole model (loss predictor included), starts as the student and moves
    toward it at the EMA rate; the loss-predictor branch has its own blocks."""
    config = load_config("mae_digits.py:tiny", "hpm.enabled=true", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1",
                         "hpm.ema_decay=0.5", "hpm.ema_end_decay=0.5")
    setup = step_lib.build(config)
    state = setup.init_fn()
    assert jax.tree.structure(state["teacher"]) == jax.tree.structure(state["params"])
    assert "blocks" in state["params"]["decoder"]["loss_pred"]
    before = jax.device_get(state["teacher"])
    batch = setup.global_batch(setup.objective.synthetic_batch(np.random.default_rng(0)))
    state, _ = setup.step_fn(state, batch)
    after, student = jax.device_get(state["teacher"]), jax.device_get(state["params"])
    for t0, t1, s1 in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(student)):
        np.testing.assert_allclose(t1, 0.5 * t0 + 0.5 * s1, rtol=1e-5, atol=1e-6)


def test_pairwise_rank_loss_rewards_the_right_order():
    actual = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    valid = jnp.array([[True, True, True, False]])
    right = mae.pairwise_rank_loss(5 * actual, actual, valid)
    wrong = mae.pairwise_rank_loss(-5 * actual, actual, valid)
    assert float(right) < 0.05 < 2.0 < float(wrong)
    assert float(mae.pairwise_rank_loss(5 * actual, actual.at[0, 3].set(100.0), valid)) == pytest.approx(float(right))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,overrides,key", [
    ("videomae_digits.py:tiny", ["data.frames=1"], "data.frames"),  # shorter than one tubelet
    ("mae_digits.py:tiny", ["mask.ratio=0.99"], "mask"),  # no visible token left
    ("flip_digits.py:tiny", ["mask.ratio=0.97"], "mask"),
    ("flip_digits.py:tiny", ["flip.text_mask_ratio=1.0"], "flip.text_mask_ratio"),
    ("flip_digits.py:tiny", ["text_model.heads=3"], "text_model.heads"),
    ("flip_digits.py:tiny", ["optim.grad_accum=2"], "optim.grad_accum"),
    ("mae_digits.py:tiny", ["loss.target=hog", "loss.hog_cell=3"], "loss.hog_cell"),
    ("mae_digits.py:tiny", ["loss.target=edges"], "loss.target"),
    ("videomae_digits.py:tiny", ["mask.decoder_ratio=0.1"], "mask.decoder_ratio"),
    ("flip_digits.py:tiny", ["flip.init_temperature=0.01"], "flip.init_temperature"),  # at the clip: no gradient
    ("flip_digits.py:tiny", ["flip.init_temperature=1.5"], "flip.init_temperature"),  # below log-scale 0
])
def test_config_errors_name_the_key(data_dir, name, overrides, key):
    with pytest.raises(config_lib.ConfigError) as err:
        step_lib.validate(load_config(name, *overrides, data_dir=data_dir), num_devices=8)
    assert err.value.key == key


def test_data_errors_name_the_record_and_field(data_dir):
    config = load_config("flip_digits.py:tiny", "data.text_key=title", data_dir=data_dir)
    with pytest.raises(DataError, match=r"record \d+ of 'maskjax_digit_captions' has no caption field data.text_key='title'"):
        next(pipeline.train_loader(config, captions=True))
    config = load_config("videomae_digits.py:tiny", "data.frames=20", "model.tubelet=2", data_dir=data_dir)
    with pytest.raises(DataError, match=r"video of 16 frames is shorter than data.frames=20 x data.frame_stride=1"):
        next(pipeline.train_loader(config))
    config = load_config("videomae_digits.py:tiny", "data.image_key=image", data_dir=data_dir)
    with pytest.raises(DataError, match=r"no field data.image_key='image'"):
        next(pipeline.train_loader(config))


# --------------------------------------------------------------------------- recipes


def test_recipes_follow_the_papers(data_dir):
    vocab = os.path.join(sources.builder(load_config("flip_digits.py", data_dir=data_dir).data).data_dir, "vocab.txt")
    c = load_config("flip_laion.py:vit_l16", f"data.tokenizer={vocab}", data_dir=data_dir)
    step_lib.validate(c, num_devices=8)
    assert (c.model.width, c.model.depth, c.model.patch_size, c.mask.ratio) == (1024, 24, 16, 0.5)
    assert c.batch_size == 32768 and config_lib.lr(c) == pytest.approx(4e-6 * 32768 / 256)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95, 0.2)
    assert load_config("flip_laion.py:vit_b16,unmasked").mask.ratio == 0.0

    v = load_config("videomae_k400.py:vit_b", data_dir=data_dir)
    step_lib.validate(v, num_devices=8)
    objective = objectives.get(v)
    assert objective.token_grid == (8, 14, 14) and objective.num_kept == 8 * int(196 * 0.1)
    assert (v.decoder.depth, v.decoder.width, v.mask.kind, v.loss.norm_pix) == (4, 384, "tube", True)
    dual = load_config("videomae_k400.py:vit_l,dual", data_dir=data_dir)
    step_lib.validate(dual, num_devices=8)
    assert dual.mask.decoder_ratio == 0.5 and dual.model.width == 1024
    with pytest.raises(config_lib.ConfigError, match="unknown variant"):
        load_config("videomae_k400.py:vit_h")


def test_image_text_folder_builder(tmp_path):
    from PIL import Image

    folder = tmp_path / "pairs"
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("validation", 3)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / split / f"{i}.png")
            (folder / split / f"{i}.txt").write_text(f"a random picture number {i}\n")
    config = load_config("flip_digits.py:tiny", "data.name=maskjax_image_text_folder", f"data.manual_dir={folder}",
                         "data.channels=3", "data.mean=(0.5, 0.5, 0.5)", "data.std=(0.5, 0.5, 0.5)",
                         "batch_size=8", "data.eval_split=validation", data_dir=str(tmp_path / "tfds"))
    batch = next(pipeline.train_loader(config, captions=True))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["text"].shape == (8, 16)
    assert len(sources.source(config.data, "validation")) == 3

    (folder / "train" / "broken.png").write_bytes(b"not a png")
    (folder / "train" / "broken.txt").write_text("broken")
    corrupt = load_config("flip_digits.py:tiny", "data.name=maskjax_image_text_folder", f"data.manual_dir={folder}",
                          "data.channels=3", "data.mean=(0.5, 0.5, 0.5)", "data.std=(0.5, 0.5, 0.5)",
                          data_dir=str(tmp_path / "tfds2"))
    with pytest.raises(DataError, match=r"record \d+ of 'maskjax_image_text_folder': 'image' is not a readable image"):
        list(pipeline.eval_batches(corrupt, "train", 16))
    (folder / "train" / "lonely.png").write_bytes(b"x")
    with pytest.raises(DataError, match="lonely.png' has no caption file"):
        sources.builder(load_config("flip_digits.py:tiny", "data.name=maskjax_image_text_folder",
                                     f"data.manual_dir={folder}", data_dir=str(tmp_path / "tfds3")).data)


@pytest.mark.parametrize("name,overrides", [
    ("flip_digits.py:tiny", ["mask.kind=block", "mask.min_patches=2"]),
    ("flip_digits.py:tiny", ["mask.kind=filtered_noise"]),
    ("simmim_digits.py:tiny", ["mask.kind=block", "mask.min_patches=2"]),
    ("mae_digits.py:tiny", ["mask.kind=filtered_noise", "mask.filter=low"]),
])
def test_block_and_filtered_noise_masks_for_every_image_objective(data_dir, name, overrides):
    config = load_config(name, *overrides, data_dir=data_dir)
    objective = objectives.get(config)
    objective.validate()
    model = objective.build(nnx.Rngs(0))
    spec = objective.batch_spec()
    batch = {k: jnp.ones(shape, dtype) for k, (shape, dtype) in spec.items()}
    loss, metrics = objective.loss(model, batch, jax.random.key(0), jnp.int32(0))
    assert np.isfinite(float(loss)) and 0.0 < float(metrics["mask_ratio"]) < 1.0
