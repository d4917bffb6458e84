"""Every objective draws each example's masks and noise from its own key (the step's key folded with the
example's row in the step's batch), so a row's draws do not depend on which other rows share its
micro-batch: the property gradient accumulation needs to give the full batch's masks. Checked without
knowing how any objective draws: shuffling the rows of a batch, with each row's index given, leaves the
loss unchanged; drawing per batch (one key for the whole batch) would change it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import objectives
from maskjax.objectives import base
from tests.conftest import load_config

CASES = [
    ("mae_digits.py:tiny", ()),
    ("mae_digits.py:tiny", ("mask.kind=block",)),
    ("mae_digits.py:tiny", ("hpm.enabled=True",)),
    ("videomae_digits.py:tiny,dual", ()),
    ("videomae_digits.py:tiny,dual", ("hpm.enabled=True",)),
    ("simmim_digits.py:tiny", ()),
    ("flip_digits.py:tiny", ()),
    ("mlm_text.py:tiny", ("mask.kind=span",)),
    ("electra_text.py:tiny", ()),
    ("mdlm_text.py:tiny", ()),
    ("mdlm_text.py:tiny", ("diffusion.antithetic=False",)),
    ("data2vec_digits.py:tiny", ()),
    ("mae_digits.py:tiny", ("loss.target=teacher",)),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[" ".join((n,) + o) for n, o in CASES])
def test_a_row_draws_the_same_wherever_it_sits_in_the_batch(data_dir, name, overrides):
    config = load_config(name, "batch_size=8", *overrides, data_dir=data_dir)
    objective = objectives.get(config)
    model = objective.build(nnx.Rngs(params=0))
    batch = {k: jnp.asarray(v) for k, v in objective.synthetic_batch(np.random.default_rng(0)).items()}
    size = next(iter(batch.values())).shape[0]
    perm = np.random.default_rng(1).permutation(size)
    shuffled = {k: v[perm] for k, v in batch.items()}
    key, step = jax.random.key(7), jnp.int32(config.total_steps // 2)
    teacher = () if objective.teacher() is None else (objective.teacher().build(nnx.Rngs(params=1)),)
    loss, metrics = objective.loss(model, batch, key, step, *teacher)
    moved, moved_metrics = objective.loss(model, dict(shuffled, **{base.ROW: jnp.asarray(perm, jnp.int32)}), key, step,
                                          *teacher)
    assert float(moved) == pytest.approx(float(loss), rel=2e-5)
    for k in metrics:
        assert float(moved_metrics[k]) == pytest.approx(float(metrics[k]), rel=2e-5, abs=1e-6), k
    # Without the rows each position draws for itself: the shuffled batch gets other masks.
    other, _ = objective.loss(model, shuffled, key, step, *teacher)
    assert float(other) != pytest.approx(float(loss), rel=1e-4)
