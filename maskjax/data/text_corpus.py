"""TFDS builder for an English corpus made from text that ships with every Python installation:
the interactive help topics (``pydoc_data.topics``) and the docstrings of the standard library.

Prepared locally (source files are parsed with ``ast``, never imported) and split by a hash of each
document's name (10% validation). A WordPiece vocabulary is trained on the train split during
preparation and stored beside the data as ``vocab.txt``. The exact content depends on the Python
version that prepares it (the description records which).
"""
from __future__ import annotations

import ast
import hashlib
import os
import platform
import sysconfig

import tensorflow_datasets as tfds

from maskjax.data import tokenizer as tokenizer_lib

VOCAB_SIZE = 4096
VALIDATION_SHARE = 10  # one document in this many goes to validation
MIN_CHARS = 80
MAX_CHARS = 2000  # long help topics are cut at paragraph boundaries into documents of about this size
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "turtledemo", "lib2to3",
             "__pycache__", "ensurepip", "tkinter"}


def _paragraph_chunks(text: str, limit: int = MAX_CHARS) -> list[str]:
    chunks, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > limit:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return [c.strip() for c in chunks if len(c.strip()) >= MIN_CHARS]


def help_topics() -> list[tuple[str, str]]:
    from pydoc_data import topics

    docs = []
    for name in sorted(topics.topics):
        for i, chunk in enumerate(_paragraph_chunks(topics.topics[name])):
            docs.append((f"topic:{name}:{i}", chunk))
    return docs


def stdlib_docstrings(stdlib: str | None = None) -> list[tuple[str, str]]:
    """(``module:qualname``, docstring) for every module, class and function docstring."""
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    docs, seen = [], set()
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", "plat-")))
        for filename in sorted(files):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(root, filename)
            module = os.path.relpath(path, stdlib)[:-3].replace(os.sep, ".")
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for qualname, text in _docstrings(tree):
                if len(text) >= MIN_CHARS and text not in seen:
                    seen.add(text)
                    docs.extend((f"{module}:{qualname}:{i}", chunk) for i, chunk in enumerate(_paragraph_chunks(text)))
    return docs


def _docstrings(tree: ast.Module):
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        text = ast.get_docstring(node)
        if text:
            yield prefix or "<module>", text
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((f"{prefix}.{child.name}" if prefix else child.name, child))


def is_validation(name: str) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16) % VALIDATION_SHARE == 0


class MaskjaxText(tfds.core.GeneratorBasedBuilder):
    """Python's help topics and standard-library docstrings: ``text`` and ``source`` (its name)."""

    HAS_VOCAB = True  # vocab.txt beside the data (see vocab_path)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "help topics + stdlib docstrings, 90/10 split by name hash, WordPiece 4096."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "English documents from Python's own texts: pydoc help topics and standard-library "
                f"docstrings (prepared with Python {platform.python_version()}). A WordPiece vocabulary "
                f"of {VOCAB_SIZE} entries trained on the train split is stored beside the data as vocab.txt."
            ),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        docs = help_topics() + stdlib_docstrings()
        if len(docs) < 100:
            raise ValueError(f"found only {len(docs)} documents in Python's help topics and standard library "
                             f"({sysconfig.get_paths()['stdlib']}); this Python ships without its sources")
        train = [d for d in docs if not is_validation(d[0])]
        validation = [d for d in docs if is_validation(d[0])]
        # self.data_dir is the temporary directory TFDS renames into place when preparation succeeds.
        tokenizer_lib.train_wordpiece([text for _, text in train], self.data_dir, VOCAB_SIZE)
        return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

    def _generate_examples(self, docs):
        for name, text in docs:
            yield name, {"text": text, "source": name}


def vocab_path(builder: tfds.core.DatasetBuilder) -> str:
    return os.path.join(builder.data_dir, "vocab.txt")

