"""Text input pipeline: TFDS documents -> subword ids -> sequences packed to ``data.seq_len``.

Each document becomes ``[CLS] ids [SEP]``; documents are concatenated in a seeded, per-epoch shuffled
order and cut into sequences of exactly ``seq_len`` tokens. Every piece of a document inside a
sequence gets its own segment id (1, 2, ...; 0 is padding) and positions that restart at 0, so the
model can block attention across documents. Like the image pipeline, order is defined on the
*global* stream: every process packs the same global batch and keeps its own rows, so data do not
depend on the process count, and the loader position is two integers (next document, token offset
inside it) that the checkpoint stores.

Batches: ``tokens``, ``segment_ids``, ``positions`` int32 [b, seq_len]; ``word_start`` bool
(the token begins a word); ``maskable`` bool (not special, not padding: MLM may mask it).
"""
from __future__ import annotations

import queue
import sys
import threading
from typing import Iterator

import ml_collections
import numpy as np

from maskjax.data import sources
from maskjax.data import tokenizer as tokenizer_lib
from maskjax.data.sources import load_tokenizer, tokenizer_path  # noqa: F401  (the text API)

READ_CHUNK = 256  # documents read and tokenized together


class Documents:
    """Tokenized documents of one split, by global stream position, read in chunks and cached.

    ``order`` maps stream positions to record indices (:class:`sources.GlobalOrder`).
    """

    def __init__(self, src, order: sources.GlobalOrder, tok: tokenizer_lib.Tokenizer, text_key: str, name: str,
                 skip_bad: bool = False):
        self.src, self.order, self.tok, self.text_key, self.name = src, order, tok, text_key, name
        self.skip_bad = skip_bad  # a record without the text field is an empty document (and a warning)
        self._chunk, self._cache = -1, []

    def __getitem__(self, position: int) -> list[int]:
        chunk = position // READ_CHUNK
        if chunk != self._chunk:
            positions = chunk * READ_CHUNK + np.arange(READ_CHUNK)
            records = self.src.__getitems__([int(i) for i in self.order(positions)])
            texts = []
            for index, record in zip(self.order(positions), records):
                if self.text_key not in record:
                    message = (f"record {int(index)} of {self.name!r} has no field data.text_key={self.text_key!r}; "
                               f"it has {sorted(record)}")
                    if not self.skip_bad:
                        raise sources.DataError(message)
                    print(f"maskjax: warning: skipped {message}", file=sys.stderr, flush=True)
                    texts.append("")
                    continue
                text = record[self.text_key]
                texts.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
            ids = self.tok.encode_batch(texts)
            if chunk == 0 and not any(ids):
                raise sources.DataError(
                    f"dataset {self.name!r} is empty: its first {min(READ_CHUNK, len(self.src))} "
                    f"documents have no text in field data.text_key={self.text_key!r}")
            self._cache = [[self.tok.cls_id] + doc + [self.tok.sep_id] for doc in ids]
            self._chunk = chunk
        return self._cache[position % READ_CHUNK]


class Packer:
    """Cuts the document stream into rows of ``seq_len`` tokens. State: (document, offset)."""

    def __init__(self, docs: Documents, seq_len: int, limit: int | None = None):
        self.docs, self.seq_len, self.limit = docs, seq_len, limit
        self.document, self.offset = 0, 0

    def exhausted(self) -> bool:
        return self.limit is not None and self.document >= self.limit

    def row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment_ids, positions) of the next row; padded (segment 0) when exhausted."""
        tokens = np.zeros(self.seq_len, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        positions = np.zeros(self.seq_len, np.int32)
        filled, segment = 0, 0
        while filled < self.seq_len and not self.exhausted():
            doc = self.docs[self.document]
            take = min(len(doc) - self.offset, self.seq_len - filled)
            segment += 1
            tokens[filled:filled + take] = doc[self.offset:self.offset + take]
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(take)
            filled += take
            self.offset += take
            if self.offset >= len(doc):
                self.document, self.offset = self.document + 1, 0
        tokens[filled:] = self.docs.tok.pad_id
        return tokens, segments, positions


def make_batch(rows: list, tok: tokenizer_lib.Tokenizer) -> dict:
    tokens, segments, positions = (np.stack(x) for x in zip(*rows))
    special = np.isin(tokens, tok.special_ids) | (segments == 0)
    word_start = tok.word_start[tokens] | (positions == 0)
    return {"tokens": tokens, "segment_ids": segments, "positions": positions,
            "word_start": word_start, "maskable": ~special}


def _documents(config, split: str, shuffle: bool) -> Documents:
    data = config.data
    src = sources.source(data, split)
    tok = load_tokenizer(data)
    return Documents(src, sources.GlobalOrder(len(src), config.seed, shuffle), tok, data.text_key, data.name,
                     skip_bad=sources._skip_bad(config))


class TextLoader:
    """Endless packed local batches with ``get_state``/``set_state``; a thread packs ahead."""

    def __init__(self, config, rows: np.ndarray | None = None):
        self.docs = _documents(config, config.data.train_split, shuffle=True)
        self.docs[0]  # a bad text field or an empty corpus fails here, before a run writes anything
        self.global_batch = config.batch_size
        self.rows = sources.block_rows(config.batch_size) if rows is None else np.asarray(rows)
        self.seq_len, self.prefetch = config.data.seq_len, max(1, config.data.prefetch)
        self._state = {"document": 0, "offset": 0}
        self._thread = None

    def _start(self) -> None:
        packer = Packer(self.docs, self.seq_len)
        packer.document, packer.offset = self._state["document"], self._state["offset"]
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()

        def produce():
            try:
                while not self._stop.is_set():
                    packed = [packer.row() for _ in range(self.global_batch)]
                    rows = [packed[i] for i in self.rows]
                    item = (make_batch(rows, self.docs.tok), {"document": packer.document, "offset": packer.offset})
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except Exception as err:  # surfaced in __next__
                self._queue.put(err)

        self._thread = threading.Thread(target=produce, daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, Exception):
            self._halt()
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        return dict(self._state)

    def set_state(self, state: dict) -> None:
        self._halt()
        self._state = {"document": int(state["document"]), "offset": int(state["offset"])}

    def close(self) -> None:
        self._halt()


def train_loader(config, rows: np.ndarray | None = None) -> TextLoader:
    return TextLoader(config, rows)


def eval_batches(config, split: str, batch_size: int, rows: np.ndarray | None = None,
                 max_batches: int = 0) -> Iterator[tuple[dict, int]]:
    """One ordered pass over ``split`` packed into rows: yields (this process's rows of a global
    batch, number of rows holding any real token). Rows after the end are all padding."""
    docs = _documents(config, split, shuffle=False)
    packer = Packer(docs, config.data.seq_len, limit=len(docs.src))
    rows = sources.block_rows(batch_size) if rows is None else rows
    count = 0
    while not packer.exhausted() and (not max_batches or count < max_batches):
        packed = [packer.row() for _ in range(batch_size)]
        real = sum(int(r[1].any()) for r in packed)
        yield make_batch([packed[i] for i in rows], docs.tok), real
        count += 1


_UNIGRAMS: dict[tuple, np.ndarray] = {}


def unigram_log_probs(config, max_tokens: int = 2_000_000) -> np.ndarray:
    """log p(token) [vocab] over the first ``max_tokens`` tokens of the train split, documents
    wrapped in [CLS] ... [SEP] as the models see them (add-one smoothed; [PAD] and [MASK] get
    probability 0): the context-free baseline of text evals. Counted once per dataset and
    tokenizer in a process, so evaluations during training reuse it."""
    d = config.data
    key = (d.name, sources.data_dir(d), d.train_split, d.text_key, tokenizer_path(d), max_tokens)
    if key not in _UNIGRAMS:
        _UNIGRAMS[key] = _count_unigram(_documents(config, d.train_split, shuffle=False), max_tokens)
    return _UNIGRAMS[key]


def _count_unigram(docs: Documents, max_tokens: int) -> np.ndarray:
    tok = docs.tok
    counts = np.zeros(tok.vocab_size, np.float64)
    seen, position = 0, 0
    while seen < max_tokens and position < len(docs.src):
        ids = np.asarray(docs[position], np.int64)
        counts += np.bincount(ids, minlength=tok.vocab_size)
        seen, position = seen + len(ids), position + 1
    counts += 1.0
    counts[[tok.pad_id, tok.mask_id]] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum()).astype(np.float32)


# --------------------------------------------------------------------------- a downstream task


def package_label(source: str) -> str | None:
    """The standard-library package a ``maskjax_text`` document comes from (``'email'`` for
    ``'email.mime.text:MIMEText:0'``), or None for a help topic."""
    module = source.split(":", 1)[0]
    return None if source.startswith("topic:") else module.split(".")[0]


PACKAGE_TASK = "package"  # eval.text_task: the embedded corpus's own downstream task


def classification_set(config, split: str, classes: int, names: list[str] | None = None,
                       max_examples: int = 0) -> tuple[dict, np.ndarray, list[str]]:
    """The labelled text set of ``eval.text_task`` for ``split``.

    ``package`` (the default) is the embedded corpus's own task: which standard-library package a
    ``maskjax_text`` docstring comes from, over the ``classes`` packages with the most documents in
    ``split`` (or ``names``). Any other value names a prepared TFDS classification dataset (for
    example ``glue/sst2``) in ``data.data_dir``, read like the pretraining data (array_record, no
    TensorFlow): the text is the features ``eval.text_fields`` (two for sentence pairs), the label its
    ClassLabel ``label``; rows without a label (GLUE's test splits: -1) are dropped.

    Returns ({tokens, segment_ids, positions} [N, seq_len]: ``[CLS] a [SEP] (b [SEP])``, each field
    cut to its share of the length, one segment, padding 0), labels [N] and the class names, in the
    split's order (``max_examples`` > 0 keeps the first that many). The tokenizer is the pretraining one."""
    task = config.eval.text_task
    if task == PACKAGE_TASK:
        texts, labels, names = _package_task(config, split, classes, names)
    else:
        texts, labels, names = _tfds_task(config, task, split)
    if max_examples:
        texts, labels = texts[:max_examples], labels[:max_examples]
    return encode_examples(load_tokenizer(config.data), texts, config.data.seq_len), labels, names


def encode_examples(tok: tokenizer_lib.Tokenizer, texts: list[tuple[str, ...]], length: int) -> dict:
    """Rows ``[CLS] a [SEP] b [SEP] ...`` of one segment, each field cut to an equal share of the room."""
    fields = len(texts[0]) if texts else 1
    room = (length - 1) // fields - 1  # every field ends with [SEP]
    if room < 1:
        raise sources.DataError(f"data.seq_len={length} leaves no room for {fields} text field(s)")
    encoded = [tok.encode_batch([t[f] for t in texts]) for f in range(fields)]
    tokens = np.full((len(texts), length), tok.pad_id, np.int32)
    segments = np.zeros((len(texts), length), np.int32)
    for row in range(len(texts)):
        ids = [tok.cls_id]
        for f in range(fields):
            ids += encoded[f][row][:room] + [tok.sep_id]
        tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _package_task(config, split, classes, names):
    data = config.data
    if "source" not in sources.builder(data).info.features.keys():
        raise sources.DataError(f"dataset {data.name!r} has no 'source' feature to label documents by; "
                                f"eval.text_task={PACKAGE_TASK!r} runs on maskjax_text")
    src = sources.source(data, split)
    records = [src[i] for i in range(len(src))]
    labels = [package_label(_decode(r["source"])) for r in records]
    if names is None:
        counts: dict[str, int] = {}
        for label in labels:
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        names = sorted(sorted(counts, key=lambda n: (-counts[n], n))[:classes])
    index = {n: i for i, n in enumerate(names)}
    chosen = [i for i, label in enumerate(labels) if label in index]
    texts = [(_decode(records[i][data.text_key]),) for i in chosen]
    return texts, np.asarray([index[labels[i]] for i in chosen], np.int64), list(names)


def _tfds_task(config, task: str, split: str):
    task_data = ml_collections.ConfigDict({**config.data.to_dict(), "name": task})
    try:
        features = sources.builder(task_data).info.features
    except sources.DataError as err:  # it names data.name; the user set eval.text_task
        raise sources.DataError(f"eval.text_task={task!r}: {err}") from None
    fields = tuple(config.eval.text_fields)
    for key in (*fields, "label"):
        if key not in features.keys():
            name = "eval.text_fields" if key != "label" else "its label"
            raise sources.DataError(f"eval.text_task={task!r} has no feature {key!r} ({name}); it has "
                                    f"{sorted(features.keys())}")
    names = getattr(features["label"], "names", None)
    if not names:
        raise sources.DataError(f"eval.text_task={task!r}: feature 'label' is not a ClassLabel")
    src = sources.source(task_data, split)
    records = [src[i] for i in range(len(src))]
    records = [r for r in records if int(r["label"]) >= 0]
    texts = [tuple(_decode(r[f]) for f in fields) for r in records]
    return texts, np.asarray([int(r["label"]) for r in records], np.int64), list(names)
