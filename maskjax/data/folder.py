"""TFDS builder for a user's folder of image + caption files (FLIP / CLIP data of your own).

Layout of the folder (given as ``data.manual_dir``, TFDS's manual directory)::

    DIR/train/0001.jpg   DIR/train/0001.txt      # one caption per image, same stem
    DIR/validation/...                           # optional: every sub-folder is a split

or the pairs directly in ``DIR`` (then one ``train`` split). Images are stored as their encoded
file bytes (any format Pillow reads) and decoded by the input pipeline, so preparing needs no
TensorFlow. A WordPiece vocabulary (8,192) trained on the train captions is stored beside the data.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VOCAB_SIZE = 8192


def find_pairs(directory: str) -> dict[str, list[tuple[str, str]]]:
    """{split: [(image path, caption path)]} sorted by name; an image without a caption is an error."""
    subdirs = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    roots = {d: os.path.join(directory, d) for d in subdirs} or {"train": directory}
    splits = {}
    for split, root in roots.items():
        pairs = []
        for name in sorted(os.listdir(root)):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                caption = os.path.join(root, stem + ".txt")
                if not os.path.isfile(caption):
                    raise ValueError(f"image {os.path.join(root, name)!r} has no caption file {caption!r}")
                pairs.append((os.path.join(root, name), caption))
        if pairs:
            splits[split] = pairs
    if not splits:
        raise ValueError(f"no image + caption pairs ({'/'.join(IMAGE_SUFFIXES)} with a .txt of the same name) "
                         f"in {directory!r}")
    return splits


class MaskjaxImageTextFolder(tfds.core.GeneratorBasedBuilder):
    """``image`` (encoded file bytes), ``caption`` (text), ``name`` (file stem) from a folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "image + caption pairs from data.manual_dir."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Set data.manual_dir to a folder of image files, each with a .txt caption."
    HAS_VOCAB = True  # vocab.txt beside the data

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs read from a folder (see maskjax.data.folder).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text(),
                "name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        from maskjax.data import tokenizer as tokenizer_lib

        splits = find_pairs(str(dl_manager.manual_dir))
        captions = [read_caption(c) for _, c in splits.get("train", next(iter(splits.values())))]
        tokenizer_lib.train_wordpiece(captions, self.data_dir, VOCAB_SIZE)
        return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs):
        for image, caption in pairs:
            with open(image, "rb") as f:
                data = f.read()
            name = os.path.splitext(os.path.basename(image))[0]
            yield name, {"image": data, "caption": read_caption(caption), "name": name}


def read_caption(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return " ".join(f.read().split())
