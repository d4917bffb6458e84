"""Pure, jit-able mask generators with static output shapes.

Every generator takes a PRNG key and returns a :class:`Mask` for a whole batch (training draws one
per example with :func:`per_row`):

* ``mask``        ``[batch, length]`` bool, True where a token is hidden;
* ``keep_idx``    ``[batch, num_kept]`` int32, the visible tokens (what an MAE encoder gathers);
* ``restore_idx`` ``[batch, length]`` int32, the inverse permutation: position ``i`` of the
  sequence ``concat(kept tokens, masked tokens)`` that holds token ``i`` (MAE's ``ids_restore``).

The number of kept tokens is a Python int fixed at trace time, so nothing recompiles when the key
changes. Argument errors are ``ValueError`` naming the argument; they are raised while tracing, from
static Python values, never from inside the computation.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
    mask: jax.Array  # [batch, length] bool, True = hidden
    keep_idx: jax.Array  # [batch, num_kept] int32
    restore_idx: jax.Array  # [batch, length] int32

    @property
    def num_kept(self) -> int:
        return self.keep_idx.shape[1]


# --------------------------------------------------------------------------- one draw per example
#
# A training step draws each example's mask from its own key, ``fold_in(step key, global row)``, so a
# row gets the same mask whether it is drawn in the full batch or in any micro-batch of gradient
# accumulation (and the two can be tested for equality). The generators below draw for a whole
# batch from one key; :func:`per_row` runs one of them once per example.


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    """[batch] keys: ``key`` folded with each example's global row index ``rows`` [batch] int."""
    return jax.vmap(lambda row: jax.random.fold_in(key, row))(rows)


def split_rows(keys: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
    """``num`` independent [batch] key arrays from [batch] keys (``jax.random.split`` per example)."""
    split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(split[:, i] for i in range(num))


def per_row(draw: Callable, keys: jax.Array, *arrays: jax.Array):
    """``draw(key, *rows)`` once per example: ``keys`` [batch], each of ``arrays`` [batch, ...] given to
    ``draw`` as a batch of one; every output (a pytree of [1, ...] arrays) comes back as [batch, ...]."""
    out = jax.vmap(lambda k, *xs: draw(k, *(x[None] for x in xs)))(keys, *arrays)
    return jax.tree.map(lambda x: x[:, 0], out)


def per_example(masker: Callable[[jax.Array, int], Mask], keys: jax.Array) -> Mask:
    """The ``masker(key, batch)`` mask of each example from its own key (``keys`` [batch])."""
    return per_row(lambda k: masker(k, 1), keys)


# --------------------------------------------------------------------------- argument checks


def check_ratio(ratio: float, name: str = "mask_ratio") -> float:
    """Validates a static mask ratio: must lie in [0, 1)."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{name}={ratio!r} must be a number in [0, 1)")
    return float(ratio)


def num_kept(length: int, ratio: float, name: str = "mask_ratio") -> int:
    """``int(length * (1 - ratio))``, the static count of visible tokens; at least one must remain."""
    check_ratio(ratio, name)
    kept = int(length * (1.0 - ratio))
    if kept < 1:
        raise ValueError(f"{name}={ratio} leaves no visible token out of {length}")
    return kept


def _check_grid(grid: Sequence[int], name: str = "grid") -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if not grid or any(g < 1 for g in grid):
        raise ValueError(f"{name}={grid} must be positive sizes")
    return grid


# --------------------------------------------------------------------------- building blocks


def from_keep_order(ids_shuffle: jax.Array, num_keep: int) -> Mask:
    """Builds a Mask from a per-example permutation whose first ``num_keep`` entries are visible.

    ids_shuffle: [batch, length] int permutation of ``range(length)``.
    """
    batch, length = ids_shuffle.shape
    ids_shuffle = ids_shuffle.astype(jnp.int32)
    restore_idx = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
    keep_idx = ids_shuffle[:, :num_keep]
    mask = restore_idx >= num_keep  # token i is hidden iff it sits after the kept block
    return Mask(mask=mask, keep_idx=keep_idx, restore_idx=restore_idx)


def from_bool_mask(mask: jax.Array, num_keep: int) -> Mask:
    """Builds a Mask from a boolean mask that hides exactly ``length - num_keep`` tokens per row.

    The kept tokens come in ascending position order. The caller guarantees the count (every
    generator in this module does); a wrong count gives a permutation that mixes kept and hidden.
    """
    ids_shuffle = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)
    return from_keep_order(ids_shuffle, num_keep)


def _rank(values: jax.Array) -> jax.Array:
    """Rank of each value along the last axis (0 = smallest)."""
    return jnp.argsort(jnp.argsort(values, axis=-1), axis=-1)


# --------------------------------------------------------------------------- generators


def random_mask(key: jax.Array, batch: int, length: int, ratio: float) -> Mask:
    """MAE's per-example uniform random masking: argsort of U(0,1) noise, keep the first
    ``int(length * (1 - ratio))`` (He et al. 2021, ``random_masking``)."""
    keep = num_kept(length, ratio)
    noise = jax.random.uniform(key, (batch, length))
    return from_keep_order(jnp.argsort(noise, axis=-1), keep)


def spatiotemporal_mask(key: jax.Array, batch: int, frames: int, grid: Sequence[int], ratio: float) -> Mask:
    """MAE-ST random masking over all ``frames * h * w`` tokens at once (no structure in time)."""
    height, width = _check_grid(grid)
    _check_frames(frames)
    return random_mask(key, batch, frames * height * width, ratio)


def tube_mask(key: jax.Array, batch: int, frames: int, grid: Sequence[int], ratio: float) -> Mask:
    """VideoMAE tube masking: one random spatial mask per example, repeated over every frame.

    Tokens are ordered time-major (``t * h * w + y * w + x``), as the 3D patch embedding produces.
    """
    height, width = _check_grid(grid)
    _check_frames(frames)
    spatial = random_mask(key, batch, height * width, ratio)
    mask = jnp.tile(spatial.mask, (1, frames))
    return from_bool_mask(mask, frames * spatial.num_kept)


def _check_frames(frames: int) -> None:
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r} must be a positive number of token frames")


def grid_mask(key: jax.Array, batch: int, grid: Sequence[int], ratio: float, cell: int) -> Mask:
    """SimMIM masking: hide ``ceil(cells * ratio)`` random cells of ``cell x cell`` patches.

    ``cell`` is the mask cell in patches (SimMIM: 32-pixel cells over 16-pixel patches -> 2). The
    hidden-token count is ``masked_cells * cell**2``, a static number slightly above ``ratio * L``.
    """
    height, width = _check_grid(grid)
    check_ratio(ratio)
    if not isinstance(cell, int) or cell < 1 or height % cell or width % cell:
        raise ValueError(f"cell={cell!r} must be a positive size dividing the patch grid {height}x{width}")
    cells_h, cells_w = height // cell, width // cell
    num_cells = cells_h * cells_w
    masked_cells = int(math.ceil(num_cells * ratio))
    keep = (num_cells - masked_cells) * cell * cell
    if keep < 1:
        raise ValueError(f"mask_ratio={ratio} leaves no visible cell out of {num_cells}")
    noise = jax.random.uniform(key, (batch, num_cells))
    cell_mask = (_rank(noise) < masked_cells).reshape(batch, cells_h, cells_w)
    mask = jnp.repeat(jnp.repeat(cell_mask, cell, axis=1), cell, axis=2).reshape(batch, height * width)
    return from_bool_mask(mask, keep)


def block_mask(
    key: jax.Array,
    batch: int,
    grid: Sequence[int],
    ratio: float | None = None,
    min_patches: int = 16,
    min_aspect: float = 0.3,
    max_attempts: int = 1000,
    num_masked: int | None = None,
) -> Mask:
    """BEiT block-wise masking with an exact count (``num_masked``, or ``L - int(L * (1 - ratio))``).

    Rectangles of area ~ U[min_patches, remaining] and log-uniform aspect ratio in
    [min_aspect, 1/min_aspect], strictly smaller than the grid, are placed at random; a rectangle is
    accepted when it hides between 1 and ``remaining`` new patches (BEiT's rule, so the target is never
    overshot). BEiT stops after 10 failed tries in a row, short of the target; here (and after
    ``max_attempts`` tries in all) the remainder is filled with uniformly random patches, so every
    example hides exactly ``L - int(L * (1 - ratio))`` patches.
    """
    height, width = _check_grid(grid)
    length = height * width
    if (ratio is None) == (num_masked is None):
        raise ValueError("block_mask needs exactly one of ratio= and num_masked=")
    if num_masked is None:
        target = length - num_kept(length, ratio)
    else:
        if not isinstance(num_masked, int) or num_masked < 0:
            raise ValueError(f"num_masked={num_masked!r} must be a non-negative int")
        if num_masked >= length:
            raise ValueError(f"num_masked={num_masked}: block mask target is not smaller than the {height}x{width} grid")
        target = num_masked
    keep = length - target
    if not isinstance(min_patches, int) or min_patches < 1:
        raise ValueError(f"min_patches={min_patches!r} must be a positive int")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect={min_aspect!r} must be in (0, 1]")
    min_area = float(min(min_patches, max(target, 1)))
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]

    def one(key):
        def cond(carry):
            mask, count, attempt, failed, _ = carry
            return (count < target) & (attempt < max_attempts) & (failed < 10)

        def body(carry):
            mask, count, attempt, failed, key = carry
            key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
            remaining = (target - count).astype(jnp.float32)
            # Python's random.uniform(min_patches, remaining), which BEiT calls: below min_patches remaining
            # it draws from (remaining, min_patches), so small rectangles can finish the mask
            area = min_area + (remaining - min_area) * jax.random.uniform(k_area)
            aspect = jnp.exp(jax.random.uniform(k_aspect, minval=log_aspect[0], maxval=log_aspect[1]))
            h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
            w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
            fits = (h >= 1) & (w >= 1) & (h < height) & (w < width)  # BEiT: strictly inside the grid
            top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
            left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
            rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            new = jnp.sum(rect & ~mask)
            accept = fits & (new > 0) & (new <= target - count)
            mask = jnp.where(accept, mask | rect, mask)
            count = jnp.where(accept, count + new, count)
            return mask, count, attempt + 1, jnp.where(accept, 0, failed + 1), key

        key, k_fill = jax.random.split(key)
        init = (jnp.zeros((height, width), bool), jnp.int32(0), jnp.int32(0), jnp.int32(0), key)
        mask, count, _, _, _ = jax.lax.while_loop(cond, body, init)
        mask = mask.reshape(length)
        # Fill what the rectangles left with random unmasked patches: exact count by rank.
        noise = jnp.where(mask, jnp.inf, jax.random.uniform(k_fill, (length,)))
        return mask | (_rank(noise) < (target - count))

    mask = jax.vmap(one)(jax.random.split(key, batch))
    return from_bool_mask(mask, keep)


def inverse_block_mask(key: jax.Array, batch: int, grid: Sequence[int], ratio: float, length: int = 3,
                       adjust: float = 0.07) -> Mask:
    """data2vec 2.0's inverse block masking (fairseq ``compute_block_mask_2d`` with ``inverse_mask``):
    the *visible* tokens come in blocks. ``int(L * (1 - ratio + adjust) / length**2)`` centres are drawn
    uniformly with replacement, each keeps the ``length x length`` square around it (offsets from
    ``-(length // 2)``, indices clamped to the grid, so edge squares pile up on the border), then the
    count is made exact: ``int(L * (1 - ratio))`` visible tokens, a uniform random subset of the blocks'
    tokens when they cover more, all of them plus uniform random others when they cover fewer. The
    rest, about ``ratio`` of the grid, is hidden."""
    height, width = _check_grid(grid)
    check_ratio(ratio)
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"mask.block_length={length!r} must be an int >= 2 (fairseq asserts mask_length > 1)")
    if not 0.0 <= adjust < 1.0:
        raise ValueError(f"mask.block_adjust={adjust!r} must be in [0, 1)")
    tokens = height * width
    keep = int(tokens * (1 - ratio))  # fairseq's float arithmetic: int(196 * (1 - 0.8)) = 39
    if keep < 1:
        raise ValueError(f"mask_ratio={ratio} leaves no visible token out of {tokens}")
    centres = int(tokens * ((1 - ratio + adjust) / length**2))
    offsets = jnp.arange(length) - length // 2

    def one(key):
        k_centre, k_pick = jax.random.split(key)
        flat = jax.random.randint(k_centre, (centres,), 0, tokens)
        rows = jnp.clip(flat[:, None] // width + offsets[None, :], 0, height - 1)  # [centres, length]
        cols = jnp.clip(flat[:, None] % width + offsets[None, :], 0, width - 1)
        cells = (rows[:, :, None] * width + cols[:, None, :]).reshape(-1)
        covered = jnp.zeros((tokens,), bool).at[cells].set(True)
        # Covered tokens first, each group in uniformly random order: the first `keep` are a uniform subset
        # of the blocks (too many) or all of them plus a uniform subset of the rest (too few).
        priority = covered.astype(jnp.float32) + jax.random.uniform(k_pick, (tokens,))
        return _rank(-priority) >= keep  # hidden

    mask = jax.vmap(one)(jax.random.split(key, batch))
    return from_bool_mask(mask, keep)


FILTERS = ("white", "low", "high", "band")


def filtered_noise_mask(
    key: jax.Array,
    batch: int,
    grid: Sequence[int],
    ratio: float,
    kind: str = "band",
    low: float = 0.15,
    high: float = 0.35,
) -> Mask:
    """ColorMAE-style data-independent masks: filter white noise in frequency and keep the top
    ``int(L * (1 - ratio))`` values visible.

    kind: ``white`` (no filter: plain random masking), ``low`` (|f| < ``low``, red noise: blobs),
    ``high`` (|f| > ``high``, blue noise: scattered), ``band`` (between, green noise: ColorMAE's
    best). Frequencies are in cycles per patch, so the cut-offs are resolution independent.
    """
    height, width = _check_grid(grid)
    length = height * width
    keep = num_kept(length, ratio)
    if kind not in FILTERS:
        raise ValueError(f"kind={kind!r} must be one of {FILTERS}")
    if not 0.0 <= low <= high:
        raise ValueError(f"low={low}, high={high} must satisfy 0 <= low <= high")
    noise = jax.random.normal(key, (batch, height, width))
    if kind != "white":
        freq_y = jnp.fft.fftfreq(height)[:, None]
        freq_x = jnp.fft.fftfreq(width)[None, :]
        radius = jnp.sqrt(freq_y**2 + freq_x**2)
        passband = {
            "low": radius <= low,
            "high": radius >= high,
            "band": (radius >= low) & (radius <= high),
        }[kind] & (radius > 0)  # drop the DC term: it only shifts every value
        spectrum = jnp.fft.fft2(noise) * passband
        noise = jnp.real(jnp.fft.ifft2(spectrum))
    # Tiny random jitter breaks ties where the filter leaves flat regions.
    noise = noise.reshape(batch, length) + 1e-6 * jax.random.uniform(jax.random.fold_in(key, 1), (batch, length))
    _, visible = jax.lax.top_k(noise, keep)
    mask = jnp.ones((batch, length), bool).at[jnp.arange(batch)[:, None], visible].set(False)
    return from_bool_mask(mask, keep)


def running_cell_mask(key: jax.Array, batch: int, frames: int, grid: Sequence[int], ratio: float = 0.5) -> Mask:
    """VideoMAE V2's decoder mask ("running cell"): the grid is tiled with 2x2 cells and each cell
    hides ``int(4 * ratio)`` (1 to 3) of its 4 tokens; the hidden pattern moves one slot per token frame, so
    every frame hides the same share and each position is hidden in turn. A random start slot per
    example. Returns the decoder's Mask (``mask`` True = dropped by the decoder)."""
    height, width = _check_grid(grid)
    _check_frames(frames)
    check_ratio(ratio, "mask.decoder_ratio")
    if height % 2 or width % 2:
        raise ValueError(f"running-cell masks need an even token grid, got {height}x{width}")
    hidden_per_cell = int(4 * ratio)  # VideoMAE V2's RunningCellMaskingGenerator truncates, and needs 1..3
    if hidden_per_cell < 1:
        raise ValueError(f"mask.decoder_ratio={ratio} hides nothing in a 2x2 cell (int(4 * ratio) = 0; use 0 to "
                         f"turn dual masking off)")
    if hidden_per_cell > 3:
        raise ValueError(f"mask.decoder_ratio={ratio} hides all 4 tokens of every 2x2 cell (int(4 * ratio) = 4), so "
                         f"the decoder would predict nothing; use a ratio below 1")
    # slot of each token inside its cell: 0 1 / 3 2 (clockwise, so a run of slots is contiguous)
    slot_of = jnp.array([[0, 1], [3, 2]], jnp.int32)
    slots = jnp.tile(slot_of, (height // 2, width // 2)).reshape(1, 1, height * width)
    start = jax.random.randint(key, (batch, 1, 1), 0, 4)
    shift = (start + jnp.arange(frames, dtype=jnp.int32)[None, :, None]) % 4
    mask = ((slots - shift) % 4 < hidden_per_cell).reshape(batch, frames * height * width)
    return from_bool_mask(mask, frames * height * width * (4 - hidden_per_cell) // 4)


def hard_patch_mask(key: jax.Array, scores: jax.Array, num_masked: int, hard_count) -> Mask:
    """HPM's mask: the ``hard_count`` patches with the highest predicted loss (``scores`` [B, L]) are
    hidden, and the rest of the ``num_masked`` hidden patches are drawn uniformly from the others.
    ``hard_count`` may be traced (it grows over training); the hidden count stays ``num_masked``."""
    batch, length = scores.shape
    if not isinstance(num_masked, int) or not 0 <= num_masked < length:
        raise ValueError(f"num_masked={num_masked!r} must be an int in [0, {length})")
    hard_count = jnp.clip(jnp.asarray(hard_count, jnp.int32), 0, num_masked)
    hard = _rank(-scores) < hard_count
    noise = jnp.where(hard, jnp.inf, jax.random.uniform(key, (batch, length)))
    rest = _rank(noise) < (num_masked - hard_count)
    return from_bool_mask(hard | rest, length - num_masked)


def random_bool_mask(key: jax.Array, shape: Sequence[int], ratio, eligible: jax.Array | None = None) -> jax.Array:
    """Hides exactly ``floor(ratio * n)`` of the ``n`` eligible positions per row; ``ratio`` may be a
    traced scalar (a schedule), since only a boolean mask of fixed shape comes out.

    shape: (batch, length); eligible: optional [batch, length] bool of positions that may be hidden.
    """
    noise = jax.random.uniform(key, tuple(shape))
    if eligible is None:
        eligible = jnp.ones(shape, bool)
    noise = jnp.where(eligible, noise, jnp.inf)
    count = jnp.floor(jnp.sum(eligible, axis=-1, keepdims=True) * ratio).astype(jnp.int32)
    return (_rank(noise) < count) & eligible


# --------------------------------------------------------------------------- text (MLM) selections
#
# Text masks select positions of a packed sequence instead of dropping tokens: each returns
# ``(selected [batch, length] bool, unit [batch, length] int32)`` where ``unit`` names the token,
# word or span a selected position belongs to (BERT's 80/10/10 draw is made once per unit).
# ``eligible`` marks positions that may be selected (never special tokens or padding); ``budget``
# [batch] int32 is how many positions to select per row (see :func:`mlm_budget`).

TEXT_KINDS = ("token", "word", "span")


def mlm_budget(eligible: jax.Array, ratio, max_predictions: int) -> jax.Array:
    """Positions to predict per row: ``round(ratio * eligible)``, at least 1 when any token is
    eligible, at most ``max_predictions`` (BERT's ``max_predictions_per_seq``). ratio may be traced."""
    count = jnp.sum(eligible, axis=-1)
    budget = jnp.round(count.astype(jnp.float32) * ratio).astype(jnp.int32)
    return jnp.clip(jnp.maximum(budget, jnp.minimum(count, 1)), 0, max_predictions)


def select_tokens(key: jax.Array, eligible: jax.Array, budget: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exactly ``budget`` eligible positions per row, uniformly at random (BERT token masking)."""
    noise = jnp.where(eligible, jax.random.uniform(key, eligible.shape), jnp.inf)
    selected = (_rank(noise) < budget[:, None]) & eligible
    unit = jnp.broadcast_to(jnp.arange(eligible.shape[1], dtype=jnp.int32), eligible.shape)
    return selected, unit


def word_ids(word_start: jax.Array) -> jax.Array:
    """[batch, length] word index of each token (0-based; position 0 always starts a word)."""
    starts = word_start.at[:, 0].set(True)
    return jnp.cumsum(starts.astype(jnp.int32), axis=-1) - 1


def _per_word(values: jax.Array, words: jax.Array, length: int, op) -> jax.Array:
    return jax.vmap(lambda v, w: op(v, w, num_segments=length))(values, words)


def select_words(key: jax.Array, word_start: jax.Array, eligible: jax.Array, budget: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Whole-word masking as BERT's ``create_pretraining_data.py`` does it: words in random order, a
    word is taken when it fits the remaining budget and skipped when it would overshoot (the next
    words are still tried, so the budget is met whenever small enough words remain). A word is
    eligible when all its tokens are; selections cover whole words."""
    batch, length = eligible.shape
    words = word_ids(word_start)
    word_len = _per_word(jnp.ones_like(words), words, length, jax.ops.segment_sum)
    word_ok = _per_word(eligible.astype(jnp.int32), words, length, jax.ops.segment_min) > 0
    word_ok &= word_len > 0
    priority = jnp.where(word_ok, jax.random.uniform(key, (batch, length)), jnp.inf)
    order = jnp.argsort(priority, axis=-1)
    sorted_len = jnp.take_along_axis(jnp.where(word_ok, word_len, 0), order, axis=-1)

    def greedy(lengths, limit):  # one row: lengths in visiting order -> taken flags
        def body(total, size):
            take = (size > 0) & (total + size <= limit)
            return total + jnp.where(take, size, 0), take

        return jax.lax.scan(body, jnp.zeros((), jnp.int32), lengths)[1]

    take_sorted = jax.vmap(greedy)(sorted_len, budget)
    take = jnp.zeros_like(take_sorted).at[jnp.arange(batch)[:, None], order].set(take_sorted)
    return jnp.take_along_axis(take, words, axis=-1) & eligible, words


def span_length_probs(p: float = 0.2, max_words: int = 10) -> jax.Array:
    """SpanBERT's span-length distribution over 1..max_words: Geometric(p) truncated and renormalised
    (``masking.py``: p (1-p)^(k-1) / sum; mean 3.8 words at p=0.2, max 10)."""
    k = jnp.arange(1, max_words + 1, dtype=jnp.float32)
    weights = p * (1.0 - p) ** (k - 1.0)
    return weights / jnp.sum(weights)


def select_spans(key: jax.Array, word_start: jax.Array, eligible: jax.Array, budget: jax.Array,
                 p: float = 0.2, max_words: int = 10) -> tuple[jax.Array, jax.Array]:
    """SpanBERT span masking (``PairWithSpanMaskingScheme.mask``): repeatedly draw a span length in
    words from :func:`span_length_probs` and an anchor token uniformly among the eligible ones; an
    anchor already selected is skipped; otherwise the span starts at the anchor's word and covers that
    many whole words, stopping at the end of the eligible run (a special token) and at the budget,
    which may cut the last span inside a word. Tokens of an earlier span stay with it. ``length``
    candidate spans are tried per row, so shapes are static. ``unit`` is the span index (BERT's
    80/10/10 draw is made per span)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"span p={p} must be in (0, 1]")
    if not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"span max_words={max_words!r} must be a positive int")
    batch, length = eligible.shape
    words = word_ids(word_start)
    positions = jnp.arange(length, dtype=jnp.int32)
    k_anchor, k_len = jax.random.split(key)
    anchor_logits = jnp.where(eligible, 0.0, -jnp.inf)
    anchors = jax.random.categorical(k_anchor, anchor_logits[:, None, :], shape=(batch, length)).astype(jnp.int32)
    spans = 1 + jax.random.categorical(k_len, jnp.log(span_length_probs(p, max_words)), shape=(batch, length))
    no_anchor = ~jnp.any(eligible, axis=-1)

    def one_row(words_row, eligible_row, anchors_row, spans_row, budget_row, empty):
        def body(carry, candidate):
            selected, unit, total = carry
            index, anchor, span = candidate
            anchor_word = words_row[anchor]
            first = jnp.min(jnp.where(words_row == anchor_word, positions, length))  # the word's start
            stop = jnp.min(jnp.where((positions >= first) & ~eligible_row, positions, length))
            member = (positions >= first) & (positions < stop) & (words_row < anchor_word + span)
            new = member & ~selected
            room = budget_row - total
            ok = (~empty) & ~selected[anchor] & (room > 0)
            add = new & (jnp.cumsum(new) <= room) & ok
            unit = jnp.where(add, index, unit)
            return (selected | add, unit, total + jnp.sum(add)), None

        init = (jnp.zeros(length, bool), jnp.zeros(length, jnp.int32), jnp.zeros((), jnp.int32))
        (selected, unit, _), _ = jax.lax.scan(body, init, (positions, anchors_row, spans_row))
        return selected, unit

    return jax.vmap(one_row)(words, eligible, anchors, spans, budget, no_anchor)


def select_text(kind: str, key: jax.Array, word_start: jax.Array, eligible: jax.Array, budget: jax.Array,
                span_p: float = 0.2, span_max: int = 10) -> tuple[jax.Array, jax.Array]:
    """Dispatches on ``kind`` in :data:`TEXT_KINDS`."""
    if kind == "token":
        return select_tokens(key, eligible, budget)
    if kind == "word":
        return select_words(key, word_start, eligible, budget)
    if kind == "span":
        return select_spans(key, word_start, eligible, budget, span_p, span_max)
    raise ValueError(f"mask.kind={kind!r} must be one of {TEXT_KINDS} for text")


# --------------------------------------------------------------------------- ratio schedules

SCHEDULES = ("constant", "linear", "cosine")


def ratio_schedule(kind: str, start: float, end: float | None = None, total_steps: int = 1) -> Callable:
    """A mask-ratio schedule ``step -> ratio`` usable inside jit (``step`` may be traced).

    constant: ``start``; linear: ``start -> end`` over ``total_steps``; cosine: ``start -> end``
    along a half cosine. After ``total_steps`` the ratio stays at ``end``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} must be one of {SCHEDULES}")
    check_ratio(start, "start")
    end = start if end is None else check_ratio(end, "end")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be a positive int")

    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        if kind == "constant":
            return jnp.full_like(frac, start)
        if kind == "linear":
            return start + (end - start) * frac
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


# --------------------------------------------------------------------------- config-driven factory

KINDS = ("random", "block", "inverse_block", "grid", "tube", "spatiotemporal", "filtered_noise")


def make_masker(mask_config, frames: int, grid: Sequence[int]) -> Callable[[jax.Array, int], Mask]:
    """Returns ``masker(key, batch) -> Mask`` for a token layout of ``frames x grid``.

    mask_config: a ConfigDict/dict with ``kind`` and ``ratio`` (and ``cell`` for grid,
    ``min_patches``/``min_aspect`` for block, ``block_length``/``block_adjust`` for inverse_block,
    ``filter``/``low``/``high`` for filtered_noise).
    Image tokens have ``frames == 1``; the 2D generators then apply unchanged.
    """
    kind, ratio = mask_config["kind"], mask_config["ratio"]
    get = mask_config.get
    if kind not in KINDS:
        raise ValueError(f"mask.kind={kind!r} must be one of {KINDS}")
    if kind == "tube":
        fn = lambda key, batch: tube_mask(key, batch, frames, grid, ratio)
    elif kind == "spatiotemporal":
        fn = lambda key, batch: spatiotemporal_mask(key, batch, frames, grid, ratio)
    else:
        if frames != 1:
            raise ValueError(f"mask.kind={kind!r} is spatial only; video needs 'tube' or 'spatiotemporal'")
        if kind == "random":
            fn = lambda key, batch: random_mask(key, batch, grid[0] * grid[1], ratio)
        elif kind == "grid":
            fn = lambda key, batch: grid_mask(key, batch, grid, ratio, get("cell", 2))
        elif kind == "block":
            fn = lambda key, batch: block_mask(
                key, batch, grid, ratio, get("min_patches", 16), get("min_aspect", 0.3)
            )
        elif kind == "inverse_block":
            fn = lambda key, batch: inverse_block_mask(
                key, batch, grid, ratio, get("block_length", 3), get("block_adjust", 0.07)
            )
        else:
            fn = lambda key, batch: filtered_noise_mask(
                key, batch, grid, ratio, get("filter", "band"), get("low", 0.15), get("high", 0.35)
            )
    # Fail on bad static arguments now, at build time, rather than at the first traced step.
    jax.eval_shape(lambda k: fn(k, 1), jax.random.key(0))
    return fn


# --------------------------------------------------------------------------- masked generative models
#
# MaskGIT and MAGE hide a *variable* share of the token grid per example; the shapes stay static
# because the mask is a boolean over all positions (the count is data, not shape).

GENERATIVE_SCHEDULES = ("cosine", "linear", "square", "sqrt")


def generative_schedule(kind: str, r: jax.Array) -> jax.Array:
    """MaskGIT's mask scheduling function gamma(r) for r in [0, 1]: the share of tokens hidden when a
    share r of the decoding is done (gamma(0) = 1, gamma(1) = 0). 'cosine' (the paper's choice) is
    cos(pi/2 r); 'linear' 1 - r; 'square' 1 - r^2; 'sqrt' 1 - sqrt(r). Clipped to [1e-6, 1] as the
    official ``mask_schedule.schedule`` does."""
    r = jnp.asarray(r, jnp.float32)
    if kind == "cosine":
        out = jnp.cos(0.5 * math.pi * r)
    elif kind == "linear":
        out = 1.0 - r
    elif kind == "square":
        out = 1.0 - r**2
    elif kind == "sqrt":
        out = 1.0 - jnp.sqrt(r)
    else:
        raise ValueError(f"schedule={kind!r} must be one of {GENERATIVE_SCHEDULES}")
    return jnp.clip(out, 1e-6, 1.0)


def truncated_normal_ratio(key: jax.Array, shape: Sequence[int], low: float, high: float, mean: float,
                           std: float) -> jax.Array:
    """Mask ratios from a normal(mean, std) truncated to [low, high] (MAGE: 0.5, 1.0, 0.55, 0.25, as
    ``scipy.stats.truncnorm((low - mean) / std, (high - mean) / std, loc=mean, scale=std)``)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"truncated normal bounds ({low}, {high}) must satisfy 0 <= low < high <= 1")
    if std <= 0:
        raise ValueError(f"std={std} must be > 0")
    z = jax.random.truncated_normal(key, (low - mean) / std, (high - mean) / std, tuple(shape), jnp.float32)
    return jnp.clip(mean + std * z, low, high)


def lowest(noise: jax.Array, count: jax.Array) -> jax.Array:
    """[batch, length] bool: the ``count`` [batch] positions of each row with the lowest ``noise``
    (exactly ``count``, ties broken by position; ``count`` may be traced)."""
    return _rank(noise) < jnp.asarray(count, jnp.int32)[:, None]


def generative_mask(key: jax.Array, length: int, ratio: jax.Array) -> jax.Array:
    """One row's hidden tokens [1, length] for a traced ``ratio`` (shape [1]): ``ceil(ratio * length)``
    positions, at least one and at most all, uniformly placed (MaskGIT: ceil(gamma(r) N); MAGE: ceil)."""
    count = jnp.clip(jnp.ceil(ratio * length - 1e-6), 1, length)
    return lowest(jax.random.uniform(key, (1, length)), count)


def reveal_counts(unknown: int, steps: int, schedule: str = "cosine") -> list[int]:
    """How many of ``unknown`` masked tokens MaskGIT's decoder still hides after each of its ``steps``
    steps (the official ``parallel_decode.decode``: floor(unknown * gamma((t + 1) / steps)), at least 1
    and at most one fewer than are hidden before the step; after the last step none)."""
    hidden, out = unknown, []
    for t in range(steps):
        if t == steps - 1:
            hidden = 0
        else:
            target = math.floor(unknown * float(generative_schedule(schedule, (t + 1) / steps)))
            hidden = max(1, min(hidden - 1, target))
        out.append(hidden)
    return out
