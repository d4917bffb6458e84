"""Input pipeline: TFDS random-access sources read by Grain, one shard per process, resumable.

Order is defined on the *global* stream: the dataset is shuffled once per epoch with the run's seed,
and global batch ``s`` is elements ``[s*B, (s+1)*B)`` of that stream. A Grain element is a whole
local batch (read with one ``__getitems__``), which keeps Grain's per-element overhead off the host. Process ``p`` of ``P`` reads
the rows of every global batch that its devices hold (``sharding.process_rows``), and the augmentation of an element is seeded by
its global position. So the data (and hence the losses) do not depend on how many processes share
the work, and the loader position is one integer that the checkpoint stores.
"""
from __future__ import annotations

import sys
from typing import Iterator

import grain
import numpy as np
from PIL import Image

from maskjax.data.sources import DataError, GlobalOrder, _skip_bad, block_rows, load_tokenizer, source

# --------------------------------------------------------------------------- preprocessing


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(img, np.float32)
    return out[..., None] if channels == 1 else out


class Preprocess:
    """record -> {'image': float32 [S, S, C] (or [T, S, S, C] for video) normalised, 'label': int32}.

    train: random resized crop (area in ``crop_scale``, aspect ratio in [3/4, 4/3]) and optional
    horizontal flip, with a NumPy generator seeded by (seed, global position); eval: plain resize.
    Videos (``data.frames > 0``): ``frames`` frames ``data.frame_stride`` apart (window start random in
    training, centred in eval), the same crop and flip on every frame.
    """

    def __init__(self, data_config, train: bool, seed: int):
        self.cfg, self.train, self.seed = data_config, train, seed
        self.mean = np.asarray(data_config.mean, np.float32) * 255.0
        self.std = np.asarray(data_config.std, np.float32) * 255.0
        self.frames = data_config.frames

    def __call__(self, item) -> dict:
        """item: (global stream position (seeds the augmentation), record index, record)."""
        position, index, record = item
        cfg = self.cfg
        if cfg.image_key not in record:
            raise DataError(f"record {index} of {cfg.name!r} has no field data.image_key={cfg.image_key!r}; "
                            f"it has {sorted(record)}")
        pixels = record[cfg.image_key]
        if isinstance(pixels, bytes) or (isinstance(pixels, np.ndarray) and pixels.dtype == object):
            pixels = _decode(pixels, cfg, index)
        pixels = np.asarray(pixels)
        if pixels.ndim == 2 + bool(self.frames):  # grey-scale without a channel axis
            pixels = pixels[..., None]
        expected = 4 if self.frames else 3
        if pixels.ndim != expected or pixels.shape[-1] != cfg.channels:
            what = "a video [T, H, W, C] (data.frames > 0)" if self.frames else "an image [H, W, C]"
            raise DataError(
                f"record {index} of {cfg.name!r}: {cfg.image_key!r} of shape {pixels.shape} does not have "
                f"data.channels={cfg.channels} channels or is not {what}"
            )
        rng = np.random.default_rng([self.seed, position]) if self.train else None
        if self.frames:
            stride = cfg.frame_stride
            span = (self.frames - 1) * stride + 1
            if len(pixels) < span:
                raise DataError(f"record {index} of {cfg.name!r}: video of {len(pixels)} frames is shorter "
                                f"than data.frames={self.frames} x data.frame_stride={stride} ({span} frames)")
            start = rng.integers(0, len(pixels) - span + 1) if self.train else (len(pixels) - span) // 2
            pixels = pixels[start:start + span:stride]
        frames = pixels if self.frames else pixels[None]
        height, width = frames.shape[1:3]
        box, flip = None, False
        if self.train:
            box = _random_crop_box(rng, width, height, cfg.crop_scale)
            flip = cfg.flip and rng.random() < 0.5
        out = np.stack([self._frame(f, box, flip) for f in frames])
        out = ((out - self.mean) / self.std).astype(np.float32)
        return {"image": out if self.frames else out[0], "label": np.int32(record.get(cfg.label_key, -1))}

    def _frame(self, frame: np.ndarray, box, flip: bool) -> np.ndarray:
        size = self.cfg.image_size
        img = _to_pil(frame.astype(np.uint8))
        if box is not None:
            img = img.resize((size, size), Image.BILINEAR, box=box)
        elif img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _from_pil(img, self.cfg.channels)


def _decode(data, cfg, index) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 [H, W, data.channels]."""
    import io

    if cfg.channels not in (1, 3):
        raise DataError(f"record {index} of {cfg.name!r}: encoded images decode to 1 or 3 channels, "
                        f"not data.channels={cfg.channels}")
    data = data.item() if isinstance(data, np.ndarray) else data
    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("L" if cfg.channels == 1 else "RGB")
    except Exception as err:  # Pillow raises several types for corrupt files
        raise DataError(f"record {index} of {cfg.name!r}: {cfg.image_key!r} is not a readable image "
                        f"({type(err).__name__}: {err})") from None
    return np.asarray(img)


def _random_crop_box(rng: np.random.Generator, width: int, height: int, scale) -> tuple[float, ...]:
    """Inception-style crop box: area fraction ~ U(scale), log-uniform aspect in [3/4, 4/3]."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    return (0.0, 0.0, float(width), float(height))


def caption_tokens(tokenizer, texts, seq_len: int) -> np.ndarray:
    """[len(texts), seq_len] int32: ``[CLS] ids [SEP]`` cut to ``seq_len`` (the [SEP] kept), then padded."""
    out = np.full((len(texts), seq_len), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(tokenizer.encode_batch(list(texts))):
        ids = [tokenizer.cls_id] + ids[: seq_len - 2] + [tokenizer.sep_id]
        out[row, : len(ids)] = ids
    return out


class Captions:
    """Adds ``text`` [b, seq_len] int32 (tokenized ``data.text_key`` of each record) to an image batch."""

    def __init__(self, data_config):
        self.tokenizer = load_tokenizer(data_config)
        self.key, self.seq_len, self.name = data_config.text_key, data_config.seq_len, data_config.name

    def __call__(self, positions, records) -> dict:
        texts = []
        for position, record in zip(positions, records):
            if self.key not in record:
                raise DataError(f"record {int(position)} of {self.name!r} has no caption field "
                                f"data.text_key={self.key!r}; it has {sorted(record)}")
            value = record[self.key]
            texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        return {"text": caption_tokens(self.tokenizer, texts, self.seq_len)}


# --------------------------------------------------------------------------- process sharding


class ProcessBatches:
    """Random-access source whose element ``s`` is this process's rows of global batch ``s``:
    global positions ``s*B + rows``, read together and preprocessed into one batch."""

    def __init__(self, src, order: GlobalOrder, preprocess: Preprocess, global_batch: int,
                 rows: np.ndarray | None, num_batches: int, captions: Captions | None = None,
                 skip_bad: bool = False, split: str = ""):
        self.src, self.order, self.preprocess = src, order, preprocess
        self.skip_bad, self.split = skip_bad, split
        self.global_batch = global_batch
        self.rows = block_rows(global_batch) if rows is None else np.asarray(rows)
        self.num_batches = num_batches
        self.captions = captions

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, step: int) -> dict:
        positions = step * self.global_batch + self.rows
        indices = self.order(positions)
        records = self.src.__getitems__([int(i) for i in indices])
        examples, bad = [], []
        for row, (g, i, r) in enumerate(zip(positions, indices, records)):
            try:
                examples.append(self.preprocess((int(g), int(i), r)))
            except DataError as err:
                if not self.skip_bad:
                    raise DataError(f"{err} (split {self.split!r}; faults.bad_records=skip would skip it)") from None
                print(f"maskjax: warning: skipped {err}", file=sys.stderr, flush=True)
                examples.append(None)
                bad.append(row)
        if bad:  # a bad record's slot repeats a good example of the batch; every other slot is unchanged
            good = [row for row, e in enumerate(examples) if e is not None]
            if not good:
                raise DataError(f"every record of batch {step} of {self.preprocess.cfg.name!r} split {self.split!r} "
                                f"is unreadable (records {[int(indices[r]) for r in bad][:8]})")
            for row in bad:
                examples[row] = examples[good[0]]
                records[row] = records[good[0]]
        batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
        if self.captions is not None:
            batch.update(self.captions(indices, records))
        batch["bad_records"] = np.int32(len(bad))
        return batch


def train_loader(config, rows: np.ndarray | None = None, captions: bool = False) -> "Loader":
    """Endless, shuffled, augmented local batches: {'image': [b, ...], 'label': [b]} (+ 'text' [b, S]
    token ids of the caption with ``captions``). ``rows``: this process's rows of each global batch
    (default: all of them)."""
    data = config.data
    src = source(data, data.train_split)
    batches = ProcessBatches(
        src, GlobalOrder(len(src), config.seed, shuffle=True), Preprocess(data, train=True, seed=config.seed),
        config.batch_size, rows, num_batches=sys.maxsize // (2 * config.batch_size),
        captions=Captions(data) if captions else None, skip_bad=_skip_bad(config), split=data.train_split,
    )
    return Loader(grain.MapDataset.source(batches), data, src)


def eval_batches(config, split: str, batch_size: int, rows: np.ndarray | None = None
                 ) -> Iterator[tuple[dict, int]]:
    """One ordered pass over ``split``: yields (this process's ``rows`` of a padded global batch,
    number of real examples in that global batch). Padding rows repeat the last example."""
    data = config.data
    src = source(data, split)
    total = len(src)
    batches = ProcessBatches(
        src, GlobalOrder(total, 0, shuffle=False), Preprocess(data, train=False, seed=0),
        batch_size, rows, num_batches=-(-total // batch_size), skip_bad=_skip_bad(config), split=split,
    )
    for i in range(len(batches)):
        batch = batches[i]
        batch.pop("bad_records")
        yield batch, min(batch_size, total - i * batch_size)


class Loader:
    """An iterator of local batches whose position can be saved and restored (``get_state``), with
    the number of bad records skipped so far (``faults.bad_records=skip``), which is part of the state."""

    def __init__(self, dataset: grain.MapDataset, data_config, source=None):
        options = grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch)
        self.iterator = iter(dataset.to_iter_dataset(options))
        self.source = source  # the TFDS data source it reads (record lookup by index)
        self.bad_records = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)
        self.bad_records += int(batch.pop("bad_records", 0))
        return batch

    def get_state(self) -> dict:
        return {**self.iterator.get_state(), "bad_records": self.bad_records}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        self.bad_records = int(state.pop("bad_records", 0))
        self.iterator.set_state(state)

    def close(self) -> None:
        """Nothing to stop: Grain's threads end with the iterator (same interface as the text loader)."""
