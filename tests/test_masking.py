"""Property tests for every mask generator: exact counts, permutations, determinism, independence,
jit/vmap; plus schedules and argument errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maskjax import masking

SETTINGS = settings(max_examples=12, deadline=None)
KEY = jax.random.key(0)


def check_mask(m: masking.Mask, length: int, num_kept: int):
    """The invariants every generator promises."""
    mask, keep, restore = np.asarray(m.mask), np.asarray(m.keep_idx), np.asarray(m.restore_idx)
    batch = mask.shape[0]
    assert mask.shape == (batch, length) and mask.dtype == bool
    assert keep.shape == (batch, num_kept) and restore.shape == (batch, length)
    assert (mask.sum(1) == length - num_kept).all(), "exact hidden count per example"
    for b in range(batch):
        assert len(set(keep[b])) == num_kept, "no duplicate kept indices"
        assert not mask[b, keep[b]].any(), "kept tokens are visible"
        # restore_idx inverts keep_idx: kept token keep[j] sits at slot j of concat(kept, hidden)
        assert (restore[b][keep[b]] == np.arange(num_kept)).all()
        assert (restore[b][mask[b]] >= num_kept).all()
        assert sorted(restore[b]) == list(range(length)), "restore_idx is a permutation"


GENERATORS = {
    "random": lambda key, b, r: masking.random_mask(key, b, 36, r),
    "block": lambda key, b, r: masking.block_mask(key, b, (6, 6), r, min_patches=4),
    "grid": lambda key, b, r: masking.grid_mask(key, b, (6, 6), r, cell=2),
    "tube": lambda key, b, r: masking.tube_mask(key, b, 3, (4, 4), r),
    "spatiotemporal": lambda key, b, r: masking.spatiotemporal_mask(key, b, 2, (4, 4), r),
    "filtered_noise": lambda key, b, r: masking.filtered_noise_mask(key, b, (6, 6), r, "band"),
}


def expected_kept(name: str, ratio: float) -> tuple[int, int]:
    if name == "tube":
        return 48, 3 * int(16 * (1 - ratio))
    if name == "spatiotemporal":
        return 32, int(32 * (1 - ratio))
    if name == "grid":
        return 36, (9 - int(np.ceil(9 * ratio))) * 4
    return 36, int(36 * (1 - ratio))


@pytest.mark.parametrize("name", sorted(GENERATORS))
@SETTINGS
@given(ratio=st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75]), seed=st.integers(0, 2**31 - 1))
def test_generator_properties(name, ratio, seed):
    fn = jax.jit(GENERATORS[name], static_argnums=(1, 2))
    length, kept = expected_kept(name, ratio)
    key = jax.random.key(seed)
    m = fn(key, 4, ratio)
    check_mask(m, length, kept)
    # deterministic for a fixed key, and the jitted result equals the eager one
    again = GENERATORS[name](key, 4, ratio)
    np.testing.assert_array_equal(np.asarray(m.mask), np.asarray(again.mask))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_examples_are_independent_and_keys_matter(name):
    m = GENERATORS[name](KEY, 16, 0.5)
    rows = {np.asarray(r).tobytes() for r in m.mask}
    assert len(rows) > 1, "examples of one batch must get different masks"
    other = GENERATORS[name](jax.random.key(1), 16, 0.5)
    assert not np.array_equal(np.asarray(m.mask), np.asarray(other.mask))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_works_under_vmap(name):
    keys = jax.random.split(KEY, 3)
    out = jax.vmap(lambda k: GENERATORS[name](k, 2, 0.5))(keys)
    length, kept = expected_kept(name, 0.5)
    assert out.mask.shape == (3, 2, length)
    for i in range(3):
        check_mask(masking.Mask(out.mask[i], out.keep_idx[i], out.restore_idx[i]), length, kept)


def test_random_mask_marginal_is_uniform():
    m = masking.random_mask(KEY, 4000, 16, 0.75)
    freq = np.asarray(m.mask).mean(0)
    assert np.allclose(freq, 0.75, atol=0.03)


def test_tube_mask_is_constant_over_time():
    m = masking.tube_mask(KEY, 8, 4, (4, 4), 0.75)
    per_frame = np.asarray(m.mask).reshape(8, 4, 16)
    assert (per_frame == per_frame[:, :1]).all()


def test_grid_mask_hides_whole_cells():
    m = masking.grid_mask(KEY, 8, (8, 8), 0.5, cell=2)
    grid = np.asarray(m.mask).reshape(8, 4, 2, 4, 2)
    assert (grid == grid[:, :, :1, :, :1]).all(), "each 2x2 cell is all hidden or all visible"


def test_block_mask_makes_contiguous_blocks_on_a_large_grid():
    """On a 14x14 grid (BEiT's), rectangles dominate: hidden patches have many hidden neighbours."""
    m = np.asarray(masking.block_mask(KEY, 16, (14, 14), 0.4).mask).reshape(16, 14, 14)
    rnd = np.asarray(masking.random_mask(KEY, 16, 196, 0.4).mask).reshape(16, 14, 14)

    def neighbour_share(x):
        right = x[:, :, 1:] & x[:, :, :-1]
        return right.sum() / x[:, :, 1:].sum()

    assert neighbour_share(m) > neighbour_share(rnd) + 0.2


def test_filtered_noise_low_pass_is_smoother_than_high_pass():
    def roughness(kind):
        x = np.asarray(masking.filtered_noise_mask(KEY, 32, (16, 16), 0.75, kind).mask).reshape(32, 16, 16)
        return np.mean(x[:, :, 1:] != x[:, :, :-1])

    assert roughness("low") < roughness("white") < roughness("high")


def test_random_bool_mask_traced_ratio_and_eligibility():
    eligible = jnp.arange(20)[None, :].repeat(4, 0) < 10
    fn = jax.jit(lambda r: masking.random_bool_mask(KEY, (4, 20), r, eligible))
    for ratio in (0.1, 0.5, 0.9):
        m = np.asarray(fn(ratio))
        assert (m.sum(1) == int(10 * ratio)).all()
        assert not m[:, 10:].any(), "ineligible positions are never hidden"


@pytest.mark.parametrize("kind,start,end,checks", [
    ("constant", 0.75, None, [(0, 0.75), (50, 0.75), (200, 0.75)]),
    ("linear", 0.3, 0.15, [(0, 0.3), (50, 0.225), (100, 0.15), (500, 0.15)]),
    ("cosine", 0.9, 0.5, [(0, 0.9), (50, 0.7), (100, 0.5)]),
])
def test_ratio_schedules(kind, start, end, checks):
    fn = masking.ratio_schedule(kind, start, end, total_steps=100)
    jitted = jax.jit(fn)
    for step, expected in checks:
        assert float(jitted(jnp.int32(step))) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: masking.random_mask(KEY, 2, 16, 1.0), "mask_ratio"),
    (lambda: masking.random_mask(KEY, 2, 16, -0.1), "mask_ratio"),
    (lambda: masking.random_mask(KEY, 2, 4, 0.9), "leaves no visible token"),
    (lambda: masking.block_mask(KEY, 2, (4, 4), num_masked=20), "num_masked=20.*larger|not smaller than the 4x4 grid"),
    (lambda: masking.grid_mask(KEY, 2, (6, 6), 0.5, cell=4), "cell=4"),
    (lambda: masking.tube_mask(KEY, 2, 0, (4, 4), 0.5), "frames=0"),
    (lambda: masking.filtered_noise_mask(KEY, 2, (4, 4), 0.5, "pink"), "kind='pink'"),
    (lambda: masking.ratio_schedule("step", 0.5), "schedule='step'"),
    (lambda: masking.make_masker({"kind": "random", "ratio": 0.5}, 2, (4, 4)), "video"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
