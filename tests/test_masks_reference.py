"""Mask samplers and targets whose reference has no library, against NumPy re-implementations written
from the official algorithms' descriptions (not from maskjax's code), compared as distributions with
a fixed seed.

- SpanBERT spans (facebookresearch/SpanBERT ``pretraining/fairseq/data/masking.py``,
  ``PairWithSpanMaskingScheme.mask``): span-length histogram (chi-square) and the exact budget.
- BERT whole-word masking (google-research/bert ``create_pretraining_data.py``,
  ``create_masked_lm_predictions``): the budget is met, since an overshooting word is skipped.
- BEiT block masks (microsoft/unilm ``beit/masking_generator.py``): the share of masked patches
  whose four neighbours are masked (blockiness) and the per-row marginal.
- SimMIM masks (microsoft/SimMIM ``data/data_simmim.py``, ``MaskGenerator``): ceil(cells x ratio) random
  32-pixel cells, repeated over the 16-pixel patches of each cell.
- VideoMAE targets (MCG-NJU/VideoMAE ``engine_for_pretraining.py``): per-channel standardisation
  within each tubelet, unbiased std + 1e-6.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from maskjax import masking


# --------------------------------------------------------------------------- SpanBERT


def _spanbert_reference(rng, word_of, ratio=0.15, p=0.2, lower=1, upper=10):
    """One sentence. ``word_of[i]``: word index of token i. Returns (mask set, span lengths in words
    as drawn, tokens per span)."""
    length = len(word_of)
    lens = np.arange(lower, upper + 1)
    probs = p * (1 - p) ** (lens - lower)
    probs /= probs.sum()
    budget = math.ceil(length * ratio)
    word_start = {w: min(i for i in range(length) if word_of[i] == w) for w in set(word_of)}
    word_end = {w: max(i for i in range(length) if word_of[i] == w) + 1 for w in set(word_of)}
    mask, spans = set(), []
    while len(mask) < budget:
        span_len = rng.choice(lens, p=probs)
        anchor = rng.integers(length)
        if anchor in mask:
            continue
        covered, word, words = 0, word_of[anchor], 0
        while words < span_len and word <= word_of[-1] and len(mask) < budget:
            for i in range(word_start[word], word_end[word]):
                if len(mask) >= budget:
                    break
                if i not in mask:
                    mask.add(i)
                    covered += 1
            word += 1
            words += 1
        spans.append(covered)
    return mask, spans


def test_span_lengths_follow_spanbert_truncated_geometric():
    """Every token its own word: tokens per span = words per span (except spans cut by the budget or
    the sentence end, which both sides cut alike). Chi-square over span sizes 1..10."""
    length, rows = 200, 300
    budget = math.ceil(length * 0.15)
    rng = np.random.default_rng(0)
    reference = np.concatenate([_spanbert_reference(rng, list(range(length)))[1] for _ in range(rows)])
    word_start = jnp.ones((rows, length), bool)
    eligible = jnp.ones((rows, length), bool)
    selected, unit = masking.select_spans(jax.random.key(1), word_start, eligible,
                                          jnp.full((rows,), budget, jnp.int32), 0.2, 10)
    selected, unit = np.asarray(selected), np.asarray(unit)
    np.testing.assert_array_equal(selected.sum(-1), budget)  # the budget exactly, like the reference
    ours = np.concatenate([np.bincount(unit[r][selected[r]])[np.unique(unit[r][selected[r]])] for r in range(rows)])
    bins = np.arange(1, 12)
    observed = np.histogram(ours, bins)[0]
    expected = np.histogram(reference, bins)[0]
    table = np.stack([observed, expected])
    table = table[:, table.sum(0) >= 10]
    assert stats.chi2_contingency(table)[1] > 1e-3, (observed, expected)
    # The clipped geometric (P(10 words) ~ 13%) is far from both: the test can tell them apart.
    clipped = np.clip(rng.geometric(0.2, len(reference)), 1, 10)
    table = np.stack([observed, np.histogram(clipped, bins)[0]])
    assert stats.chi2_contingency(table[:, table.sum(0) >= 10])[1] < 1e-6
    truncated = 0.2 * 0.8 ** np.arange(10)
    assert (truncated / truncated.sum() * np.arange(1, 11)).sum() == pytest.approx(3.8, abs=0.05)


def test_spans_cover_whole_words_except_the_cut_at_the_budget():
    rng = np.random.default_rng(2)
    rows, length = 64, 96
    word_start = jnp.asarray(rng.uniform(size=(rows, length)) < 0.6)
    eligible = jnp.ones((rows, length), bool).at[:, [0, -1]].set(False)
    budget = masking.mlm_budget(eligible, 0.15, length)
    selected, unit = masking.select_spans(jax.random.key(3), word_start, eligible, budget, 0.2, 10)
    selected, words = np.asarray(selected), np.asarray(masking.word_ids(word_start))
    np.testing.assert_array_equal(selected.sum(-1), np.asarray(budget))
    assert not (selected & ~np.asarray(eligible)).any()
    partial = [sum(0 < selected[r][words[r] == w].sum() < (words[r] == w).sum() for w in np.unique(words[r]))
               for r in range(rows)]
    assert max(partial) <= 2  # the span cut at the budget (its word can be the start of another span)


# --------------------------------------------------------------------------- whole-word masking


def test_whole_word_masking_skips_an_overshooting_word_and_meets_the_budget():
    """BERT skips a word that would overshoot ``num_to_predict`` and tries the next; stopping at the
    first overshoot (the old behaviour) leaves rows short of the budget."""
    rng = np.random.default_rng(4)
    rows, length = 128, 64
    word_start = jnp.asarray(rng.uniform(size=(rows, length)) < 0.35)  # words of ~3 tokens
    eligible = jnp.ones((rows, length), bool)
    budget = masking.mlm_budget(eligible, 0.15, length)
    selected, _ = masking.select_words(jax.random.key(5), word_start, eligible, budget)
    counts = np.asarray(selected).sum(-1)
    assert (counts <= np.asarray(budget)).all()
    # Reference: shuffled words, skip the ones that overshoot (single-token words always fit at the end).
    ref = []
    for r in range(rows):
        ids = np.asarray(masking.word_ids(word_start))[r]
        sizes = np.bincount(ids)
        total = 0
        for w in rng.permutation(len(sizes)):
            if total + sizes[w] <= int(budget[r]):
                total += sizes[w]
        ref.append(total)
    assert abs(counts.mean() - np.mean(ref)) < 0.3, (counts.mean(), np.mean(ref))
    assert counts.mean() >= 0.97 * float(np.asarray(budget).mean())


# --------------------------------------------------------------------------- BEiT blocks


def _beit_reference(rng, height, width, num_masking, min_patches=16, min_aspect=0.3):
    """BEiT's MaskingGenerator (max_num_patches = num_masking)."""
    mask = np.zeros((height, width), bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        budget = num_masking - count
        delta = 0
        for _ in range(10):
            target = min_patches + (budget - min_patches) * rng.random()  # Python's uniform(a, b), a > b allowed
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    delta += new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


def _blockiness(masks):
    """Share of masked patches whose 4 neighbours (inside the grid) are all masked."""
    m = np.asarray(masks)
    padded = np.pad(m, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    inner = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return float((m & inner).sum() / m.sum())


def test_block_masks_match_beit_generator():
    rows, grid, target = 1000, (14, 14), 75  # blocks make rows correlated: 400 examples are too noisy
    rng = np.random.default_rng(6)
    reference = np.stack([_beit_reference(rng, *grid, target) for _ in range(rows)])
    ours = np.asarray(masking.block_mask(jax.random.key(7), rows, grid, num_masked=target).mask).reshape(rows, *grid)
    assert (ours.sum((1, 2)) == target).all()
    assert reference.sum((1, 2)).mean() > 0.97 * target  # BEiT itself nearly always reaches the target
    assert _blockiness(ours) == pytest.approx(_blockiness(reference), abs=0.04)
    # Marginals: both favour the centre; compare the per-row masking rate profile.
    np.testing.assert_allclose(ours.mean((0, 2)), reference.mean((0, 2)), atol=0.05)
    random = np.asarray(masking.random_mask(jax.random.key(8), rows, 196, target / 196).mask).reshape(rows, *grid)
    assert _blockiness(random) < _blockiness(reference) - 0.15  # the statistic tells blocks from noise


# --------------------------------------------------------------------------- SimMIM cells


def _simmim_reference(rng, input_size=192, mask_patch_size=32, model_patch_size=4, ratio=0.6):
    """SimMIM's MaskGenerator at its ViT-B 224 setting scaled: token grid of mask cells, a random
    permutation picks ceil(count * ratio) of them, each repeated to the model's patch grid."""
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    count = rand_size ** 2
    mask = np.zeros(count, int)
    mask[rng.permutation(count)[:int(np.ceil(count * ratio))]] = 1
    return mask.reshape(rand_size, rand_size).repeat(scale, axis=0).repeat(scale, axis=1)


def test_grid_masks_match_simmim_mask_generator():
    rows = 2000
    rng = np.random.default_rng(10)
    reference = np.stack([_simmim_reference(rng, 224, 32, 16, 0.6) for _ in range(rows)])  # 7x7 cells, 14x14 patches
    ours = np.asarray(masking.grid_mask(jax.random.key(11), rows, (14, 14), 0.6, 2).mask).reshape(rows, 14, 14)
    np.testing.assert_array_equal(ours.sum((1, 2)), reference.sum((1, 2)))  # ceil(49 * 0.6) = 30 cells, always
    cells = ours.reshape(rows, 7, 2, 7, 2)
    assert (cells.min((2, 4)) == cells.max((2, 4))).all()  # whole cells only
    # Every cell equally likely: the per-cell rate of both against the expected 30/49 (binomial, 2000 draws).
    for masks in (ours, reference):
        rate = masks.reshape(rows, 7, 2, 7, 2)[:, :, 0, :, 0].mean(0)
        assert stats.chisquare(rate.ravel() * rows, np.full(49, rows * 30 / 49))[1] > 1e-3


# --------------------------------------------------------------------------- VideoMAE targets


def test_videomae_channel_targets_match_engine_for_pretraining():
    """VideoMAE: rearrange b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c, subtract the mean over
    the tubelet's pixels per channel, divide by unbiased std + 1e-6, flatten (p c)."""
    from maskjax.models import vit
    from maskjax.objectives import vision

    rng = np.random.default_rng(9)
    video = rng.normal(size=(2, 4, 8, 8, 3)).astype(np.float32) * 2 + 1  # [B, T, H, W, C]
    b, t, h, w, c = video.shape
    x = video.reshape(b, t // 2, 2, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(b, -1, 2 * 4 * 4, c)
    expected = (x - x.mean(-2, keepdims=True)) / (x.std(-2, ddof=1, keepdims=True) + 1e-6)
    patches = vit.patchify(jnp.asarray(video), 4, 2)
    ours = vision.norm_pix(patches, channels=3, mode="channel")
    np.testing.assert_allclose(np.asarray(ours), expected.reshape(b, -1, 2 * 4 * 4 * c), rtol=1e-5, atol=1e-5)
