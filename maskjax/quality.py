"""Sample quality of generative objectives, computable offline: a Fréchet distance in the feature space
of a classifier maskjax trains on the run's own (embedded) training split, and the accuracy with which
that classifier recognises the class of class-conditional samples.

This is not FID: FID's feature space is an Inception network trained on ImageNet, and its numbers
are not comparable with these. Here the features are the penultimate layer of a small MLP on raw
pixels (:class:`Classifier`), trained deterministically in seconds; on 16x16 digits it is a good
judge of "is this a digit, and which". Every number comes with its references in the same space
(``evaluate_generation``): held-out real images (the floor), the tokenizer's reconstructions (what a
perfect token model would reach) and decoded uniformly random tokens (the ceiling).

``maskjax.evaluate`` draws the samples and the references and calls this module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


_JUDGES: dict[tuple, Classifier] = {}


def classifier_for(config, images: np.ndarray, labels: np.ndarray) -> Classifier:
    """The judge for a run's data, trained once per dataset within a process (a study evaluates many
    runs); ``images``/``labels``: that dataset's training split."""
    d = config.data
    key = (d.name, d.data_dir, d.train_split, d.image_size, d.channels)
    if key not in _JUDGES:
        _JUDGES[key] = Classifier(images, labels, int(labels.max()) + 1)
    return _JUDGES[key]
