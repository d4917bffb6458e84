"""TFDS builder for scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes).

Prepared locally from the copy that ships inside scikit-learn (no network), upsampled to 16x16 so a
ViT with 4-pixel patches sees a 4x4 grid, and split 80/20 stratified with a fixed seed.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 16


class MaskjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits as a TFDS dataset: ``image`` uint8 [16, 16, 1], ``label`` 0-9."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "16x16 upsampled scans, stratified 80/20 train/test split (seed 0)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn handwritten digits (UCI optdigits test set), 8x8 scans upsampled to 16x16.",
            features=tfds.features.FeaturesDict({
                # Tensor, not Image: encoding PNGs would need TensorFlow.
                "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        index = np.arange(len(digits.target))
        train, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=0)
        images = np.stack([_upsample(x) for x in digits.images])
        return {
            "train": self._generate_examples(images[train], digits.target[train], train),
            "test": self._generate_examples(images[test], digits.target[test], test),
        }

    def _generate_examples(self, images, labels, ids):
        for image, label, key in zip(images, labels, ids):
            yield int(key), {"image": image[..., None], "label": int(label)}


def _upsample(scan: np.ndarray) -> np.ndarray:
    """8x8 scan with values 0..16 -> 16x16 uint8 (bilinear)."""
    pixels = np.clip(np.round(scan * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
