"""Sample quality of generative objectives, computable offline: a Fréchet distance in the feature space
of a classifier maskjax trains on the run's own (embedded) training split, and the accuracy with which
that classifier recognises the class of class-conditional samples.

This is not FID: FID's feature space is an Inception network trained on ImageNet, and its numbers
are not comparable with these. Here the features are the penultimate layer of a small MLP on raw
pixels (:class:`Classifier`), trained deterministically in seconds; on 16x16 digits it is a good
judge of "is this a digit, and which". Every number comes with its references in the same space
(``evaluate_generation``): held-out real images (the floor), the tokenizer's reconstructions (what a
perfect token model would reach) and decoded uniformly random tokens (the ceiling).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskjax import metrics as metrics_lib
from maskjax import storage


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` [n, d] and ``b`` [m, d]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. tr((S_a S_b)^(1/2)) is the sum of
    the square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric, so ``eigh`` is exact
    where ``scipy.linalg.sqrtm`` of the non-symmetric product can return complex noise)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * np.sum(np.sqrt(np.clip(middle, 0.0, None))))


class Classifier:
    """An MLP on flattened normalised pixels (``hidden`` -> ``feature_dim`` -> classes, ReLU), trained
    with Adam on a whole split from a fixed seed: the same weights on every process and every call.
    :meth:`features` is the penultimate layer (the Fréchet distance's space)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: int, *, hidden: int = 256,
                 feature_dim: int = 64, steps: int = 1500, batch: int = 128, lr: float = 1e-3, seed: int = 0):
        x = jnp.asarray(images.reshape(len(images), -1), jnp.float32)
        y = jnp.asarray(labels, jnp.int32)
        sizes = [x.shape[1], hidden, feature_dim, classes]
        keys = jax.random.split(jax.random.key(seed), len(sizes))
        params = [(jax.random.normal(k, (i, o)) * np.sqrt(2.0 / i), jnp.zeros(o))
                  for k, i, o in zip(keys, sizes[:-1], sizes[1:])]
        opt = optax.adamw(lr, weight_decay=1e-4)

        def loss_fn(p, idx):
            logits = self._logits(p, x[idx])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]))

        @jax.jit
        def train(p, key):
            def body(carry, k):
                p, s = carry
                grads = jax.grad(loss_fn)(p, jax.random.randint(k, (batch,), 0, x.shape[0]))
                updates, s = opt.update(grads, s, p)
                return (optax.apply_updates(p, updates), s), None

            (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), jax.random.split(key, steps))
            return p

        self.params = jax.device_get(train(params, keys[-1]))
        self.classes, self.feature_dim = classes, feature_dim

    @staticmethod
    def _hidden(p, x):
        for w, b in p[:-1]:
            x = jax.nn.relu(x @ w + b)
        return x

    @staticmethod
    def _logits(p, x):
        w, b = p[-1]
        return Classifier._hidden(p, x) @ w + b

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(self._hidden)(self.params, jnp.asarray(images.reshape(len(images), -1), jnp.float32)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = jnp.asarray(images.reshape(len(images), -1), jnp.float32)
        return np.asarray(jnp.argmax(jax.jit(self._logits)(self.params, x), -1))


@functools.lru_cache(maxsize=4)
def _classifier(key: tuple, images_bytes: bytes, labels_bytes: bytes, shape: tuple, classes: int) -> Classifier:
    images = np.frombuffer(images_bytes, np.float32).reshape(shape)
    return Classifier(images, np.frombuffer(labels_bytes, np.int32), classes)


def classifier_for(config, images: np.ndarray, labels: np.ndarray) -> Classifier:
    """The judge for a run's data (cached per dataset within a process: a study evaluates many runs)."""
    classes = int(labels.max()) + 1
    key = (config.data.name, config.data.train_split, config.data.image_size)
    return _classifier(key, np.ascontiguousarray(images, np.float32).tobytes(),
                       np.ascontiguousarray(labels, np.int32).tobytes(), images.shape, classes)


def split_images(setup, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised images [N, H, W, C], labels [N]) of a whole split, on every process."""
    from maskjax import evaluate
    from maskjax.data import pipeline

    batch_size = evaluate._eval_batch_size(setup)
    rows = setup.rows(batch_size)
    images, labels = [], []
    for local, real in pipeline.eval_batches(setup.config, split, batch_size, rows):
        whole = evaluate.gather_rows({"label": local["label"], "image": local["image"]}, rows)
        images.append(whole["image"][:real])
        labels.append(whole["label"][:real])
    return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int32)


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
    from maskjax import evaluate

    batch_size = evaluate._eval_batch_size(setup)
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
    judge = classifier_for(config, train_x, train_y)
    test_f = judge.features(test_x)
    samples, labels = generate(setup, params, teacher, num, steps, seed=config.seed + 3, temperature=temperature,
                               guidance=guidance)
    real = train_x[:num]
    recon = round_trip(setup, params, teacher, real)
    noise = random_token_images(setup, params, teacher, num, seed=config.seed + 4)

    def scored(images, classes=None):
        out = {"frechet_distance": frechet_distance(judge.features(images), test_f), "num": int(len(images))}
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
