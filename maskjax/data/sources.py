"""Where data comes from: the TFDS builders (embedded, local, or any prepared TFDS dataset), their
random-access sources, the seeded global element order, and the tokenizer a dataset names.

Below both input pipelines (:mod:`maskjax.data.pipeline` for images, :mod:`maskjax.data.text` for
packed text); nothing here decodes or batches.
"""
from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from maskjax.data import tokenizer as tokenizer_lib
from maskjax.data.digits import MaskjaxDigitCaptions, MaskjaxDigits, MaskjaxMovingDigits
from maskjax.data.folder import MaskjaxImageTextFolder
from maskjax.data.text_corpus import MaskjaxText, vocab_path
from maskjax import storage
from maskjax.errors import MaskjaxError

# Built here from data that ships with Python and scikit-learn (prepared on first use).
EMBEDDED = {"maskjax_digits": MaskjaxDigits, "maskjax_digit_captions": MaskjaxDigitCaptions,
            "maskjax_moving_digits": MaskjaxMovingDigits, "maskjax_text": MaskjaxText}
# Built from the user's files in ``data.manual_dir`` (prepared on first use).
LOCAL = {"maskjax_image_text_folder": MaskjaxImageTextFolder}


class DataError(MaskjaxError, ValueError):
    """A dataset, split or record that cannot be used; the message names it."""


def default_data_dir() -> str:
    """Where datasets live when ``data.data_dir`` is empty: $MASKJAX_DATA_DIR, $TFDS_DATA_DIR or TFDS's default."""
    return os.path.expanduser(os.environ.get("MASKJAX_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")


def data_dir(data_config) -> str:
    """The local TFDS data_dir of ``data``: ``data.data_dir`` (or the default), or, when that is on an object
    store (``gs://``), its local mirror with ``data.name`` staged into it (:func:`stage`)."""
    directory = os.path.expanduser(data_config.data_dir) if data_config.data_dir else default_data_dir()
    return stage(data_config.name, directory) if storage.remote(directory) else directory


def prepared_dir(name: str, directory: str) -> str | None:
    """The prepared version directory of dataset ``name`` (``NAME``, ``NAME/CONFIG``, optionally
    ``:VERSION``; the newest version when none is given) in ``directory`` (any store), or None."""
    name, _, version = name.partition(":")
    base = storage.join(directory, *name.split("/"))
    versions = [v for v in storage.listdir(base) if re.fullmatch(r"\d+\.\d+\.\d+", v)
                and (not version or v == version) and storage.exists(storage.join(base, v, "dataset_info.json"))]
    if not versions:
        return None
    return storage.join(base, max(versions, key=lambda v: tuple(int(x) for x in v.split("."))))


_staged: dict[tuple[str, str], str] = {}


def stage(name: str, remote: str) -> str:
    """Copies the prepared dataset ``name`` from the object-store data_dir ``remote`` to this host's disk
    (``$MASKJAX_CACHE_DIR``, default ``~/.cache/maskjax``, under the bucket's path) unless the copy there is
    complete (same files, same sizes), and returns that local data_dir. array_record files are read with
    random access by C++ that opens local files only, so every host keeps its own copy; processes of one
    host share it (a file lock). An embedded dataset the bucket does not hold is prepared in the mirror."""
    import fcntl

    if (name, remote) in _staged:
        return _staged[(name, remote)]
    local = storage.mirror(remote)
    found = prepared_dir(name, remote)
    if found is not None:
        target = os.path.join(local, storage.relative(found, remote))
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, ".maskjax_staging.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            wanted = storage.files(found)
            if not wanted:
                raise DataError(f"dataset {name!r} in {remote!r}: {found} has no files")
            for rel, size in sorted(wanted.items()):
                path = os.path.join(target, rel)
                if not (os.path.isfile(path) and os.path.getsize(path) == size):
                    storage.copy_file(storage.join(found, rel), path)
    elif name not in EMBEDDED:
        raise DataError(f"dataset {name!r} is not prepared in data_dir {remote!r} (no {name}/VERSION/"
                        "dataset_info.json there)")
    _staged[(name, remote)] = local
    return local


def builder(data_config) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for ``data.name``; embedded datasets are prepared on first use."""
    name, directory = data_config.name, data_dir(data_config)
    if name in EMBEDDED or name in LOCAL:
        try:
            b = (EMBEDDED.get(name) or LOCAL[name])(data_dir=directory, file_format="array_record")
        except ValueError as err:  # prepared in another format: TFDS refuses to change it
            raise _not_random_access(name, directory, err) from None
    if name in EMBEDDED:
        if not b.is_prepared():
            b.download_and_prepare()
        return b
    if name in LOCAL:
        if not b.is_prepared():
            manual = data_config.manual_dir
            if not manual or not os.path.isdir(os.path.expanduser(manual)):
                raise DataError(f"dataset {name!r} is not prepared in {directory!r} and data.manual_dir={manual!r} "
                                "is not a folder of image + caption files")
            try:
                b.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=os.path.expanduser(manual)))
            except ValueError as err:
                raise DataError(f"data.manual_dir={manual!r}: {err}") from None
        return b
    try:
        b = tfds.builder(name, data_dir=directory)
    except (tfds.core.DatasetNotFoundError, ValueError):  # ValueError: not even a dataset name's syntax
        raise DataError(f"data.name={name!r} is not a TFDS dataset (embedded: {sorted(EMBEDDED)})") from None
    if not b.is_prepared():
        raise DataError(
            f"dataset {name!r} is not prepared in data_dir {directory!r}; prepare it with "
            f"`tfds build {name} --data_dir {directory} --file_format array_record`"
        )
    return b


def _not_random_access(name: str, directory: str, err: Exception) -> DataError:
    return DataError(f"dataset {name!r} in {directory!r} is not in a random-access format (array_record): "
                     f"{str(err).splitlines()[0]}; convert it once with `maskjax data convert --name {name} "
                     f"--data_dir {directory}`")


def source(data_config, split: str):
    """A random-access TFDS data source for ``split``."""
    b = builder(data_config)
    try:
        b.info.splits[split]  # accepts TFDS slices such as 'train[:99%]'
    except (KeyError, ValueError):
        raise DataError(f"dataset {data_config.name!r} has no split {split!r}; it has {sorted(b.info.splits)}") from None
    try:
        src = b.as_data_source(split)
    except NotImplementedError as err:
        raise _not_random_access(data_config.name, data_dir(data_config), err) from None
    if len(src) == 0:
        raise DataError(f"dataset {data_config.name!r} split {split!r} is empty")
    return src


class GlobalOrder:
    """The global element stream: position ``g`` -> record index. With ``shuffle``, epoch
    ``g // n`` is a permutation seeded by (seed, epoch); without, positions past the end repeat the
    last record (padding for eval)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return np.minimum(positions, self.n - 1)
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            perm = self._perms.get(int(epoch))
            if perm is None:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)
                self._perms = {int(epoch): perm}  # keep one epoch: batches move forward
            out[epochs == epoch] = perm[offsets[epochs == epoch]]
        return out


def block_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Process ``p`` of ``P`` holding rows ``[p*B/P, (p+1)*B/P)`` of every global batch (the layout of
    a mesh whose devices are ordered by process; the trainer asks the mesh: ``sharding.process_rows``)."""
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
    local = batch_size // process_count
    return np.arange(process_index * local, (process_index + 1) * local)


def _skip_bad(config) -> bool:
    return config.faults.bad_records == "skip"


def tokenizer_path(data_config, prepare: bool = True) -> str | None:
    """``data.tokenizer`` when set; otherwise the vocabulary stored beside an embedded corpus, which is
    prepared first; with ``prepare=False`` (validation) None when it is not prepared yet."""
    if data_config.tokenizer:
        return data_config.tokenizer
    builders = {**EMBEDDED, **LOCAL}
    if getattr(builders.get(data_config.name), "HAS_VOCAB", False):
        if not prepare and not builders[data_config.name](
                data_dir=data_dir(data_config), file_format="array_record").is_prepared():
            return None
        return vocab_path(builder(data_config))
    raise DataError(
        f"data.tokenizer is not set: dataset {data_config.name!r} needs a tokenizer file "
        "(a SentencePiece .model or a WordPiece vocab.txt)")


def load_tokenizer(data_config) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load(tokenizer_path(data_config))


def check_tokenizer(data_config) -> None:
    """Validation's check of the tokenizer: loads it when that needs nothing prepared or written (an
    embedded corpus's vocabulary only exists once the corpus is prepared, at the first build)."""
    path = tokenizer_path(data_config, prepare=False)
    if path is not None:
        tokenizer_lib.load(path)
