"""Evaluation of a pretrained model. Images: linear probe and k-NN on frozen features, next to the
same encoder at random initialisation and raw pixels, end-to-end fine-tuning when
``eval.finetune_epochs > 0``, plus a PNG of reconstructions. Text: held-out
masked-token loss and accuracy (MLM) or the ELBO perplexity bound (MDLM), next to the most-frequent
token and unigram baselines, and a downstream task on frozen features (``text_probe``) next to the
encoder at random init and a bag-of-words classifier. Generative objectives (MaskGIT, MAGE): samples
scored by :mod:`maskjax.quality` beside held-out real images, the tokenizer's reconstructions and
random codes, and a PNG grid of samples.

Results go to ``workdir/eval.json`` with the checkpoint step they used.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from maskjax import metrics as metrics_lib
from maskjax import quality, sharding, storage
from maskjax.data import pipeline, sources
from maskjax.objectives import base


def features_fn(setup, teacher=None):
    """Jitted ``(params, batch) -> [B, D]`` frozen encoder features, replicated on every process
    (``teacher``: the frozen module's parameters an ``eval_teacher`` objective reads, e.g. a tokenizer)."""
    return setup.jit_model_call(setup.objective.features, teacher)


def _eval_batch_size(setup) -> int:
    """The eval batch, rounded up to a multiple of the data shards."""
    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    size = setup.config.eval.batch_size
    return -(-size // shards) * shards


def extract(setup, fn, params_by_name: dict, split: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """One ordered pass over ``split``: ({name: features [N, D]} for each parameter set, labels [N],
    raw pixels [N, P]). ``fn`` comes from :func:`features_fn`, built once per eval (with no parameter
    sets, only labels and pixels are read)."""
    batch_size = _eval_batch_size(setup)
    feats = {name: [] for name in params_by_name}
    labels, pixels = [], []
    rows = setup.rows(batch_size)
    for local, real in pipeline.eval_batches(setup.config, split, batch_size, rows):
        if params_by_name:
            batch = setup.global_batch(local)
        for name, params in params_by_name.items():
            feats[name].append(np.asarray(fn(params, batch))[:real])
        # Every process fits the probes, so it needs the whole batch's labels and pixels.
        whole = gather_rows({"label": local["label"], "image": local["image"]}, rows)
        labels.append(whole["label"][:real])
        pixels.append(whole["image"].reshape(len(whole["image"]), -1)[:real])
    return {name: np.concatenate(f) for name, f in feats.items()}, np.concatenate(labels), np.concatenate(pixels)


def gather_rows(local: dict, rows: np.ndarray) -> dict:
    """This process's ``rows`` of a global batch -> the whole batch in row order, on every process."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in local.items()}
    gathered = multihost_utils.process_allgather({"rows": rows, **local}, tiled=True)
    _, first = np.unique(np.asarray(gathered["rows"]), return_index=True)  # replicas hold the same rows
    return {k: np.asarray(gathered[k])[first] for k in local}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int) -> dict:
    """Linear probe (standardised features, logistic regression) and cosine k-NN accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    linear = LogisticRegression(max_iter=3000).fit(scaler.transform(train_x), train_y)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    return {
        "linear_probe": float(linear.score(scaler.transform(test_x), test_y)),
        "knn": float(knn.score(test_x, test_y)),
    }


def run(setup, params, workdir: str, step: int, writer=None, teacher=None) -> dict:
    """Probes (pretrained vs random init vs raw pixels), the reconstruction PNG and, for generative
    objectives, sample quality; writes eval.json. ``teacher``: ``Setup.eval_teacher``'s parameters."""
    from maskjax import faults

    faults.point("eval")
    config = setup.config
    results: dict[str, Any] = {"step": int(step), "objective": config.objective,
                               "train_split": config.data.train_split, "eval_split": config.data.eval_split}
    declared = base.check_evaluators(setup.objective)
    if config.eval.probe and "probe" in declared:
        from maskjax.step import init_params_fn

        k = config.eval.knn_k
        encoders = {"pretrained": params, "random_init": init_params_fn(setup, jax.random.key(config.seed + 1))}
        fn = features_fn(setup, teacher)
        train_f, train_y, train_px = extract(setup, fn, encoders, config.data.train_split)
        test_f, test_y, test_px = extract(setup, fn, encoders, config.data.eval_split)
        results.update(num_train=len(train_y), num_test=len(test_y), knn_k=k)
        for name in encoders:
            results[name] = probe(train_f[name], train_y, test_f[name], test_y, k)
        results["raw_pixels"] = probe(train_px, train_y, test_px, test_y, k)
        if config.eval.finetune_epochs > 0:
            results["finetune"] = finetune(setup, params)
    if "text" in declared:
        results["text"] = evaluate_text(setup, params)
    if "text_probe" in declared and config.eval.text_probe:
        results["text_probe"] = evaluate_text_probe(setup, params)
    if "zero_shot" in declared and config.eval.zero_shot:
        results["zero_shot"] = evaluate_zero_shot(setup, params)
    if "reconstruction" in declared and config.eval.num_images:
        results["reconstruction_png"] = save_reconstructions(setup, params, workdir, step, writer, teacher)
    if "generation" in declared and config.generate.eval_samples:
        results["generation"] = evaluate_generation(setup, params, teacher, workdir, step, writer)
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "eval.json"), json.dumps(results, indent=2))
        if writer is not None:
            flat = {f"eval/{group}/{name}": value
                    for group in ("pretrained", "random_init", "raw_pixels", "text", "zero_shot", "finetune")
                    for name, value in results.get(group, {}).items()}
            for group in ("pretrained", "random_init", "bag_of_words"):
                for name, value in results.get("text_probe", {}).get(group, {}).items():
                    if name == "finetune":
                        flat[f"eval/text_probe/{group}/finetune_accuracy"] = value["accuracy"]
                    else:
                        flat[f"eval/text_probe/{group}/{name}"] = value
            writer.scalars(step, flat, jsonl=False)
    return results


def finetune(setup, params) -> dict:
    """End-to-end fine-tuning of an image encoder on the pretraining dataset's labels
    (:func:`tune_classifier`), the pretraining crops and flips as augmentation; no mixup / RandAugment /
    layer-wise decay."""
    from maskjax.data import pipeline as pipeline_lib

    config = setup.config
    classes = int(sources.builder(config.data).info.features[config.data.label_key].num_classes)
    examples = len(sources.source(config.data, config.data.train_split))
    steps = max(1, int(np.ceil(config.eval.finetune_epochs * examples / config.batch_size)))
    loader = pipeline_lib.train_loader(config, setup.rows(config.batch_size))
    try:
        train = (setup.global_batch(next(loader)) for _ in range(steps))  # image and label
        batch_size = _eval_batch_size(setup)
        rows = setup.rows(batch_size)
        test = ((setup.global_batch(local), gather_rows({"label": local["label"]}, rows)["label"][:real])
                for local, real in pipeline_lib.eval_batches(config, config.data.eval_split, batch_size, rows))
        return tune_classifier(setup, params, setup.objective.features, classes, train, steps, test)
    finally:
        loader.close()


def tune_classifier(setup, params, features, classes: int, train, steps: int, test) -> dict:
    """Fine-tunes ``features(model, batch) -> [B, D]`` end to end with a zero-initialised linear head,
    the MAE paper's main protocol and the GLUE role of the text papers at small scale: cross-entropy,
    AdamW at ``eval.finetune_lr`` (weight decay 0.05) with 10% warm-up and cosine decay, over ``steps``
    global batches of ``train`` (each with ``label``); then top-1 accuracy over ``test``, pairs of (a
    global batch, its real rows' labels). Runs on the training mesh with the same shardings; ``params``
    are left untouched."""
    import optax

    config, graphdef = setup.config, setup.graphdef
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.eval.finetune_lr, warmup, steps)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.05)
    with setup.activations():
        width = jax.eval_shape(lambda p, b: features(nnx.merge(graphdef, p), b), params,
                               setup.abstract_batch()).shape[-1]
    replicated = sharding.replicated(setup.mesh)
    head = {"kernel": jax.device_put(np.zeros((width, classes), np.float32), replicated),
            "bias": jax.device_put(np.zeros((classes,), np.float32), replicated)}
    tuned = {"encoder": jax.tree.map(lambda x: x.copy(), params), "head": head}  # the pretrained copy stays

    def logits(p, batch):
        with setup.activations():
            feats = features(nnx.merge(graphdef, p["encoder"]), batch)
        return feats.astype(np.float32) @ p["head"]["kernel"] + p["head"]["bias"]

    def step(p, opt_state, batch):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch), batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = jax.jit(optimizer.init)(tuned)
    step_fn = jax.jit(step, donate_argnums=(0, 1))
    losses = []
    progress = metrics_lib.Progress(steps, 0, config.batch_size, enabled=jax.process_index() == 0)
    progress.message(f"fine-tuning {steps} steps")
    every = max(1, steps // 10)
    for i, batch in enumerate(train, 1):
        tuned, opt_state, loss = step_fn(tuned, opt_state, batch)
        losses.append(loss)
        if i % every == 0 or i == steps:
            progress.show(i, float(loss), *progress.rate(i))
    progress.close()
    logits_fn = jax.jit(logits, out_shardings=replicated)
    correct = total = 0
    for batch, labels in test:
        predicted = np.asarray(logits_fn(tuned, batch)).argmax(-1)[:len(labels)]
        correct += int((predicted == labels).sum())
        total += len(labels)
    first, last = float(np.mean(jax.device_get(losses[:5]))), float(np.mean(jax.device_get(losses[-5:])))
    return {"accuracy": correct / total, "epochs": float(config.eval.finetune_epochs), "steps": steps,
            "lr": float(config.eval.finetune_lr), "train_loss_first": first, "train_loss_last": last}


def evaluate_text(setup, params) -> dict:
    """Sums ``objective.eval_step`` over the eval split (fixed keys, so repeatable) and lets the
    objective turn the totals into metrics."""
    from maskjax.data import text as text_data

    config, objective = setup.config, setup.objective
    unigram = jax.device_put(text_data.unigram_log_probs(config), sharding.replicated(setup.mesh))

    fn = setup.jit_model_call(objective.eval_step)  # unigram is an argument: as a constant XLA would fold it
    base_key = jax.random.key(config.seed + 3)
    totals: dict[str, float] = {}
    batch_size = _eval_batch_size(setup)
    batches = text_data.eval_batches(config, config.data.eval_split, batch_size, setup.rows(batch_size),
                                     config.eval.max_batches)
    for i, (local, _) in enumerate(batches):
        sums = jax.device_get(fn(params, setup.global_batch(local), jax.random.fold_in(base_key, i), unigram))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return objective.summarize(totals)


def bag_of_words(batch: dict, vocab_size: int) -> np.ndarray:
    """Token counts per row [N, vocab] (padding excluded), L2-normalised: the bag-of-words baseline."""
    tokens, real = batch["tokens"], batch["segment_ids"] > 0
    counts = np.zeros((len(tokens), vocab_size), np.float32)
    np.add.at(counts, (np.nonzero(real)[0], tokens[real]), 1.0)
    return counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-6)


def evaluate_text_probe(setup, params) -> dict:
    """The downstream text task ``eval.text_task`` (:func:`maskjax.data.text.classification_set`):
    linear probe and k-NN on the frozen mean-pooled features of the pretrained encoder and of the same
    encoder at random init, next to a bag-of-words linear classifier and the majority class; with
    ``eval.finetune_epochs`` > 0 both encoders are also fine-tuned end to end (:func:`tune_classifier`).
    The package task is skipped, with the reason, on datasets whose documents carry no package of origin."""
    from maskjax.data import text as text_data
    from maskjax.step import init_params_fn

    config = setup.config
    package = config.eval.text_task == text_data.PACKAGE_TASK
    if package and "source" not in sources.builder(config.data).info.features.keys():
        return {"skipped": f"dataset {config.data.name!r} has no 'source' feature (the package task is defined "
                           "on maskjax_text)"}
    train_split, test_split = config.eval.text_splits
    classes = config.eval.text_classes
    train_b, train_y, names = text_data.classification_set(config, train_split, classes)
    test_b, test_y, _ = text_data.classification_set(config, test_split, classes, names)
    fn = setup.jit_model_call(setup.objective.text_features)
    batch_size = _eval_batch_size(setup)
    rows = setup.rows(batch_size)

    def padded(batch: dict):
        """(global batch of ``batch_size`` rows, real rows) over ``batch`` in order, the last one padded."""
        for start in range(0, len(batch["tokens"]), batch_size):
            chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
            real = len(chunk["tokens"])
            chunk = {k: np.concatenate([v, np.zeros((batch_size - real, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
            yield setup.global_batch({k: v[rows] for k, v in chunk.items()}), real

    def features(params, batch: dict) -> np.ndarray:
        return np.concatenate([np.asarray(fn(params, b))[:real] for b, real in padded(batch)])

    k = config.eval.knn_k
    task = "standard-library package of a docstring" if package else config.eval.text_task
    results: dict[str, Any] = {"task": task, "classes": names, "splits": [train_split, test_split],
                               "num_train": len(train_y), "num_test": len(test_y),
                               "majority_class": float(np.max(np.bincount(test_y)) / len(test_y))}
    encoders = {"pretrained": params, "random_init": init_params_fn(setup, jax.random.key(config.seed + 1))}
    for name, p in encoders.items():
        results[name] = probe(features(p, train_b), train_y, features(p, test_b), test_y, k)
    vocab = setup.objective.tokenizer.vocab_size
    results["bag_of_words"] = probe(bag_of_words(train_b, vocab), train_y, bag_of_words(test_b, vocab), test_y, k)
    if config.eval.finetune_epochs > 0:
        train_rows = setup.rows(config.batch_size)
        if len(train_y) < config.batch_size:
            raise sources.DataError(f"eval.text_task={config.eval.text_task!r}: {len(train_y)} training examples "
                                    f"in {train_split!r}, fewer than batch_size={config.batch_size}")
        per_epoch = len(train_y) // config.batch_size
        steps = max(1, int(np.ceil(config.eval.finetune_epochs * per_epoch)))
        train_b = {**train_b, "label": train_y.astype(np.int32)}

        def shuffled():
            """Seeded epochs of whole batches, the same on every process."""
            rng = np.random.default_rng(config.seed + 4)
            while True:
                order = rng.permutation(len(train_y))
                for b in range(per_epoch):
                    idx = order[b * config.batch_size:(b + 1) * config.batch_size][train_rows]
                    yield setup.global_batch({key: v[idx] for key, v in train_b.items()}, also=("label",))

        for name, p in encoders.items():
            batches = shuffled()
            train = (next(batches) for _ in range(steps))
            test = ((b, test_y[i * batch_size:i * batch_size + real]) for i, (b, real) in enumerate(padded(test_b)))
            results[name]["finetune"] = tune_classifier(setup, p, setup.objective.text_features, len(names),
                                                        train, steps, test)
    return results


def class_names(config) -> list[str]:
    """``eval.class_names``, or the names of the eval dataset's ClassLabel ``data.label_key``."""
    if config.eval.class_names:
        return list(config.eval.class_names)
    features = sources.builder(config.data).info.features
    names = getattr(features[config.data.label_key], "names", None) if config.data.label_key in features.keys() else None
    if not names:
        raise sources.DataError(
            f"dataset {config.data.name!r}: data.label_key={config.data.label_key!r} is not a ClassLabel with "
            "names; set eval.class_names for zero-shot classification")
    return list(names)


def evaluate_zero_shot(setup, params) -> dict:
    """Zero-shot accuracy on the eval split: every class name in every ``eval.prompts`` template
    through the text tower, the class with the most similar embedding wins; chance is 1 / classes."""
    config, objective = setup.config, setup.objective
    names, templates = class_names(config), list(config.eval.prompts)
    prompts = [template.format(name) for name in names for template in templates]
    tokens = pipeline.caption_tokens(objective.tokenizer, prompts, config.data.seq_len)
    replicated = sharding.replicated(setup.mesh)

    embed = setup.jit_model_call(lambda model, tokens: objective.class_embeddings(model, tokens, len(names)))
    classes = embed(params, jax.device_put(tokens, replicated))
    logits = setup.jit_model_call(objective.zero_shot_logits)
    correct = total = 0
    batch_size = _eval_batch_size(setup)
    rows = setup.rows(batch_size)
    for local, real in pipeline.eval_batches(config, config.data.eval_split, batch_size, rows):
        batch = setup.global_batch(local)
        predicted = np.argmax(np.asarray(logits(params, batch, classes)), axis=1)[:real]
        labels = gather_rows({"label": local["label"]}, rows)["label"][:real]
        correct += int(np.sum(predicted == labels))
        total += real
    return {"accuracy": correct / total, "chance": 1.0 / len(names), "num_classes": len(names),
            "num_prompts": len(templates), "num_examples": total}


# --------------------------------------------------------------------------- generation (maskjax.quality)


def split_images(setup, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised images [N, H, W, C], labels [N]) of a whole split, on every process."""
    _, labels, pixels = extract(setup, None, {}, split)
    images = pixels.reshape((len(pixels),) + tuple(setup.objective.image_shape()))
    return images.astype(np.float32), labels.astype(np.int32)


def generate(setup, params, teacher, num: int, steps: int, *, seed: int = 0, temperature=None, guidance=None,
             chunk: int = 250) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [num, H, W, C], labels [num] or None): ``num`` samples in chunks of ``chunk`` (one
    compilation), classes cycling 0, 1, ..., C-1 when the model is class-conditional."""
    objective = setup.objective
    classes = objective.num_classes
    chunk = min(chunk, num)

    def draw(model, key, offset, *, teacher):
        labels = (offset + jnp.arange(chunk)) % classes if classes else None
        tokens = objective.sample(model, key, chunk, steps, labels, temperature, guidance)
        return objective.images(tokens, teacher=teacher)

    fn = setup.jit_model_call(draw, teacher)
    out = [np.asarray(fn(params, jax.random.fold_in(jax.random.key(seed), i), np.int32(i)))
           for i in range(0, num, chunk)]
    labels = np.arange(num) % classes if classes else None
    return np.concatenate(out)[:num], labels


def round_trip(setup, params, teacher, images: np.ndarray) -> np.ndarray:
    """``images`` through the run's tokenizer and back, in eval batches."""
    batch_size = _eval_batch_size(setup)
    rows = setup.rows(batch_size)
    fn = setup.jit_model_call(setup.objective.round_trip, teacher)
    out = []
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        padded = np.concatenate([part, np.zeros((batch_size - len(part),) + part.shape[1:], part.dtype)])
        labels = np.zeros(batch_size, np.int32)
        batch = setup.global_batch({"image": padded[rows], "label": labels[rows]})
        out.append(np.asarray(fn(params, batch))[:len(part)])
    return np.concatenate(out)


def random_token_images(setup, params, teacher, num: int, seed: int = 0) -> np.ndarray:
    """Images decoded from uniformly random codes: the far reference of the Fréchet distance."""
    objective = setup.objective
    tokens = jax.random.randint(jax.random.key(seed), (num, objective.num_tokens), 0, objective.codebook_size)
    fn = setup.jit_model_call(lambda model, t, *, teacher: objective.images(t, teacher=teacher), teacher)
    return np.asarray(fn(params, tokens))


def sample_grid(images: np.ndarray, labels: np.ndarray | None, classes: int, per_row: int = 10) -> list[np.ndarray]:
    """Rows for :func:`maskjax.metrics.image_grid`: a row per class (its first ``per_row`` samples) for
    class-conditional samples, else rows of ``per_row``."""
    if labels is not None and classes:
        rows = [images[labels == c][:per_row] for c in range(classes)]
        n = min(len(r) for r in rows)
        return [r[:n] for r in rows if n]
    n = len(images) // per_row * per_row or len(images)
    width = min(per_row, n)
    return [images[i:i + width] for i in range(0, n, width)][:10]


def evaluate_generation(setup, params, teacher, workdir: str, step: int, writer=None, *, steps: int | None = None,
                        num: int | None = None, temperature=None, guidance=None, png: bool = True) -> dict:
    """Samples of the run scored against the eval split in a classifier's feature space, beside held-out
    real images, the tokenizer's reconstructions and random tokens; the samples' PNG grid."""
    config, objective = setup.config, setup.objective
    gen = config.generate
    steps = steps or gen.steps
    num = num or gen.eval_samples
    train_x, train_y = split_images(setup, config.data.train_split)
    test_x, test_y = split_images(setup, config.data.eval_split)
    judge = quality.classifier_for(config, train_x, train_y)
    test_f = judge.features(test_x)
    samples, labels = generate(setup, params, teacher, num, steps, seed=config.seed + 3, temperature=temperature,
                               guidance=guidance)
    real = train_x[:num]
    recon = round_trip(setup, params, teacher, real)
    noise = random_token_images(setup, params, teacher, num, seed=config.seed + 4)

    def scored(images, classes=None):
        out = {"frechet_distance": quality.frechet_distance(judge.features(images), test_f), "num": int(len(images))}
        if classes is not None:
            out["class_accuracy"] = float(np.mean(judge.predict(images) == classes))
        return out

    results = {
        "feature_space": f"maskjax.quality.Classifier (MLP on pixels, {judge.feature_dim}-d penultimate layer) "
                         f"trained on {config.data.train_split}; distances to {config.data.eval_split}",
        "classifier_test_accuracy": float(np.mean(judge.predict(test_x) == test_y)),
        "steps": int(steps),
        "choice_temperature": float(gen.choice_temperature if temperature is None else temperature),
        "guidance": float(gen.guidance if guidance is None else guidance),
        "samples": scored(samples, labels),
        "real_train_images": scored(real, train_y[:num]),
        "tokenizer_reconstructions": scored(recon, train_y[:num]),
        "random_tokens": scored(noise),
    }
    if png:
        grid = metrics_lib.image_grid(sample_grid(samples, labels, objective.num_classes), config.data.mean,
                                      config.data.std, scale=4)
        path = storage.join(workdir, "samples", f"step_{step:07d}.png")
        if jax.process_index() == 0:
            metrics_lib.save_png(path, grid)
            if writer is not None:
                writer.image(step, "samples", grid)
        results["png"] = path
    return results


VIDEO_CLIPS = 4  # clips shown in a video reconstruction PNG (3 rows of frames each)


def save_reconstructions(setup, params, workdir: str, step: int, writer=None, teacher=None) -> str:
    """Rows: the images ``objective.reconstruct`` returns, in its order (input, masked input,
    reconstruction for masked models; input, reconstruction for a tokenizer), for the first
    ``eval.num_images`` eval images; for video, a row of frames of each per clip, for up to 4 clips."""
    config = setup.config
    batch_size = _eval_batch_size(setup)
    local, _ = next(pipeline.eval_batches(config, config.data.eval_split, batch_size, setup.rows(batch_size)))
    batch = setup.global_batch(local)
    key = jax.random.key(config.seed + 2)

    out = setup.jit_model_call(lambda model, batch, **kw: setup.objective.reconstruct(model, batch, key, **kw),
                               teacher)(params, batch)
    n = config.eval.num_images
    rows = [np.asarray(images)[:n] for images in out.values()]
    if rows[0].ndim == 5:  # video: a strip per clip, rows input / masked / reconstructed frames
        rows = [kind[i] for i in range(min(n, VIDEO_CLIPS)) for kind in rows]
    grid = metrics_lib.image_grid(rows, config.data.mean, config.data.std)
    path = storage.join(workdir, "reconstructions", f"step_{step:07d}.png")
    if jax.process_index() == 0:
        metrics_lib.save_png(path, grid)
        if writer is not None:
            writer.image(step, "reconstructions", grid)
    return path


def summary_line(results: dict) -> str:
    parts = [f"eval @ step {results['step']}"]
    for name, value in results.get("text", {}).items():
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    if "zero_shot" in results:
        z = results["zero_shot"]
        parts.append(f"zero-shot {z['accuracy']:.3f} (chance {z['chance']:.3f})")
    probe_text = results.get("text_probe", {})
    if "pretrained" in probe_text:
        parts.append("text probe: " + " / ".join(f"{g} {probe_text[g]['linear_probe']:.3f}" for g in
                                                  ("pretrained", "random_init", "bag_of_words")))
        if "finetune" in probe_text["pretrained"]:
            parts.append("text fine-tuned: " + " / ".join(
                f"{g} {probe_text[g]['finetune']['accuracy']:.3f}" for g in ("pretrained", "random_init")))
    for group in ("pretrained", "random_init", "raw_pixels"):
        if group in results:
            r = results[group]
            parts.append(f"{group}: linear {r['linear_probe']:.3f} / {results.get('knn_k')}-NN {r['knn']:.3f}")
    if "finetune" in results:
        parts.append(f"fine-tuned ({results['finetune']['epochs']:g} epochs) {results['finetune']['accuracy']:.3f}")
    return " | ".join(parts)
