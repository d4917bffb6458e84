"""Subword tokenizers for text objectives: WordPiece (a BERT-style ``vocab.txt``) and SentencePiece
(a ``.model`` file), behind one small interface that also knows the special tokens and which
vocabulary entries start a word (for whole-word and span masking).

Nothing is downloaded: a tokenizer is always a local file. The embedded corpus trains its own
WordPiece vocabulary at preparation time (:func:`train_wordpiece`).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from maskjax import storage
from maskjax.errors import MaskjaxError

SPECIAL_NAMES = {  # role -> spellings accepted, in order of preference
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerError(MaskjaxError, ValueError):
    """A tokenizer file that is missing, unreadable or lacks a required token; names the file."""


class Tokenizer:
    """Encodes text to ids (no special tokens added) and decodes ids back.

    Attributes: ``vocab_size``, ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``,
    ``special_ids`` (ids never masked by MLM), ``word_start`` (bool [vocab]: the entry begins a
    word; special tokens count as words of their own), ``path``, ``lowercase`` (a WordPiece
    vocabulary without upper-case pieces: text is lower-cased before splitting).
    """

    def __init__(self, path: str, pieces: Sequence[str], ids: dict[str, int], word_start: np.ndarray, backend):
        self.path, self.pieces, self._backend = path, list(pieces), backend
        self.vocab_size = len(self.pieces)
        self.lowercase = getattr(backend, "lowercase", False)
        self.pad_id, self.unk_id = ids["pad"], ids["unk"]
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.special_ids = sorted({self.pad_id, self.cls_id, self.sep_id, self.mask_id})
        word_start = np.asarray(word_start, bool).copy()
        word_start[self.special_ids + [self.unk_id]] = True
        self.word_start = word_start

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._backend.encode_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self.pieces[token_id]


def _find_ids(path: str, lookup, extra: dict[str, int | None]) -> dict[str, int]:
    ids = {}
    for role, names in SPECIAL_NAMES.items():
        found = extra.get(role)
        for name in names:
            if found is not None:
                break
            found = lookup(name)
        if found is None:
            what = "mask token" if role == "mask" else f"{role} token"
            raise TokenizerError(f"tokenizer {path!r} has no {what} (looked for {' or '.join(names)})")
        ids[role] = found
    return ids


class _WordPiece:
    def __init__(self, vocab: dict[str, int], lowercase: bool):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        self.lowercase = lowercase
        unk = "[UNK]" if "[UNK]" in vocab else "<unk>"
        self.tok = HFTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        self.tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=None)
        self.tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.tok.decoder = decoders.WordPiece(prefix="##")

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)


class _SentencePiece:
    def __init__(self, processor):
        self.sp = processor

    def encode_batch(self, texts):
        return self.sp.encode(texts)

    def decode(self, ids):
        return self.sp.decode(ids)


def _load_wordpiece(path: str) -> Tokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            pieces = [line.rstrip("\n").rstrip("\r") for line in f]
    except UnicodeDecodeError:
        raise TokenizerError(f"tokenizer {path!r} is not a UTF-8 WordPiece vocab.txt") from None
    while pieces and not pieces[-1]:
        pieces.pop()
    if len(pieces) < len(WORDPIECE_SPECIALS) + 1:
        raise TokenizerError(f"tokenizer {path!r} has {len(pieces)} entries; not a WordPiece vocabulary")
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    ids = _find_ids(path, vocab.get, {})
    # Cased vocabularies (bert-base-cased) hold upper-case pieces; uncased ones only lower case.
    lowercase = not any(p[:1].isupper() for p in pieces if not p.startswith("["))
    word_start = np.array([not p.startswith("##") for p in pieces])
    return Tokenizer(path, pieces, ids, word_start, _WordPiece(vocab, lowercase))


def _load_sentencepiece(path: str) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as err:  # sentencepiece raises OSError/RuntimeError with a long message
        raise TokenizerError(f"tokenizer {path!r} is not a readable SentencePiece model "
                             f"({type(err).__name__})") from None
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    unk = sp.unk_id()

    def lookup(name):
        i = sp.piece_to_id(name)
        return None if i == unk and name not in ("<unk>", "[UNK]") else i

    native = {
        "pad": sp.pad_id() if sp.pad_id() >= 0 else None,
        "unk": unk,
        "cls": sp.bos_id() if sp.bos_id() >= 0 else None,
        "sep": sp.eos_id() if sp.eos_id() >= 0 else None,
        "mask": None,
    }
    ids = _find_ids(path, lookup, native)
    word_start = np.array([p.startswith("\u2581") or sp.is_control(i) or sp.is_unknown(i)
                           for i, p in enumerate(pieces)])
    return Tokenizer(path, pieces, ids, word_start, _SentencePiece(sp))


@functools.lru_cache(maxsize=8)
def load(path: str) -> Tokenizer:
    """A tokenizer from ``path`` (local or ``gs://``, copied to the cache first): ``*.model`` is
    SentencePiece, anything else a WordPiece vocab.txt."""
    if path and storage.remote(path):
        if not storage.isfile(path):
            raise TokenizerError(f"tokenizer file {path!r} does not exist")
        path = storage.local_copy(path)
    if not path or not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"tokenizer file {path!r} is not readable")
    if path.endswith(".model"):
        return _load_sentencepiece(path)
    return _load_wordpiece(path)


def train_wordpiece(texts: Sequence[str], directory: str, vocab_size: int, lowercase: bool = True) -> str:
    """Trains a BERT-style WordPiece vocabulary on ``texts``; writes and returns ``directory/vocab.txt``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=WORDPIECE_SPECIALS,
        limit_alphabet=200, continuing_subword_prefix="##", show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    vocab = tok.get_vocab()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(piece + "\n")
    return path
