"""Pure, jit-able mask generators with static output shapes.

Every generator takes a PRNG key and returns a :class:`Mask` for a whole batch:

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
    max_attempts: int = 100,
    num_masked: int | None = None,
) -> Mask:
    """BEiT block-wise masking with an exact count (``num_masked``, or ``L - int(L * (1 - ratio))``).

    Rectangles of area ~ U[min_patches, remaining] and log-uniform aspect ratio in
    [min_aspect, 1/min_aspect] are placed at random; a rectangle is accepted when it hides between 1
    and ``remaining`` new patches (BEiT's rule, so the target is never overshot). After
    ``max_attempts`` tries (or when no rectangle fits, e.g. on tiny grids) the remainder is filled with
    uniformly random patches, so every example hides exactly ``L - int(L * (1 - ratio))`` patches.
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
            mask, count, attempt, _ = carry
            return (count < target) & (attempt < max_attempts)

        def body(carry):
            mask, count, attempt, key = carry
            key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
            remaining = (target - count).astype(jnp.float32)
            area = jax.random.uniform(k_area, minval=min_area, maxval=jnp.maximum(remaining, min_area))
            aspect = jnp.exp(jax.random.uniform(k_aspect, minval=log_aspect[0], maxval=log_aspect[1]))
            h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
            w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
            fits = (h >= 1) & (w >= 1) & (h <= height) & (w <= width)
            top = jnp.floor(jax.random.uniform(k_top) * (height - h + 1)).astype(jnp.int32)
            left = jnp.floor(jax.random.uniform(k_left) * (width - w + 1)).astype(jnp.int32)
            rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            new = jnp.sum(rect & ~mask)
            accept = fits & (new > 0) & (new <= target - count)
            mask = jnp.where(accept, mask | rect, mask)
            count = jnp.where(accept, count + new, count)
            return mask, count, attempt + 1, key

        key, k_fill = jax.random.split(key)
        init = (jnp.zeros((height, width), bool), jnp.int32(0), jnp.int32(0), key)
        mask, count, _, _ = jax.lax.while_loop(cond, body, init)
        mask = mask.reshape(length)
        # Fill what the rectangles left with random unmasked patches: exact count by rank.
        noise = jnp.where(mask, jnp.inf, jax.random.uniform(k_fill, (length,)))
        return mask | (_rank(noise) < (target - count))

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

KINDS = ("random", "block", "grid", "tube", "spatiotemporal", "filtered_noise")


def make_masker(mask_config, frames: int, grid: Sequence[int]) -> Callable[[jax.Array, int], Mask]:
    """Returns ``masker(key, batch) -> Mask`` for a token layout of ``frames x grid``.

    mask_config: a ConfigDict/dict with ``kind`` and ``ratio`` (and ``cell`` for grid,
    ``min_patches``/``min_aspect`` for block, ``filter``/``low``/``high`` for filtered_noise).
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
        else:
            fn = lambda key, batch: filtered_noise_mask(
                key, batch, grid, ratio, get("filter", "band"), get("low", 0.15), get("high", 0.35)
            )
    # Fail on bad static arguments now, at build time, rather than at the first traced step.
    jax.eval_shape(lambda k: fn(k, 1), jax.random.key(0))
    return fn
