"""TFDS builders made from scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes).

Prepared locally from the copy that ships inside scikit-learn (no network), upsampled to 16x16 so a
ViT with 4-pixel patches sees a 4x4 grid, and split 80/20 stratified with a fixed seed. Three
datasets share those images and that split:

* ``maskjax_digits``: the images and labels;
* ``maskjax_digit_captions``: each image with a caption made from its label in one of several
  templates ("a scan of a handwritten seven"), for image-text (FLIP) training;
* ``maskjax_moving_digits``: Moving-MNIST-style clips, each digit bouncing on a 32x32 canvas.
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
        return {name: self._generate_examples(*split) for name, split in digit_splits().items()}

    def _generate_examples(self, images, labels, ids):
        for image, label, key in zip(images, labels, ids):
            yield int(key), {"image": image[..., None], "label": int(label)}


def digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{'train'|'test': (images [N, 16, 16] uint8, labels [N], original indices [N])}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=0)
    images = np.stack([_upsample(x) for x in digits.images])
    return {name: (images[ids], digits.target[ids], ids) for name, ids in (("train", train), ("test", test))}


CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a scan of a handwritten {}.",
    "a photo of the digit {}.",
    "the number {}, written by hand.",
    "a small grey image of a {}.",
    "a blurry handwritten digit {}.",
    "a low resolution picture of the number {}.",
)
PROMPT_TEMPLATES = ("a handwritten {}.", "a picture of the digit {}.")  # zero-shot prompts, not captions


class MaskjaxDigitCaptions(tfds.core.GeneratorBasedBuilder):
    """Digits with captions: ``image`` uint8 [16, 16, 1], ``label`` 0-9 (names zero..nine),
    ``caption`` text. Each image is captioned with one template chosen by a seeded draw. A WordPiece
    vocabulary of the captions is stored beside the data (``vocab.txt``)."""

    HAS_VOCAB = True  # vocab.txt beside the data (see vocab_path)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "digits with one templated caption each (6 templates), WordPiece vocab."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn digits with captions made from their labels in several templates.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                "caption": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        from maskjax.data import tokenizer as tokenizer_lib

        splits = digit_splits()
        captions = {name: [caption(int(i), int(y)) for y, i in zip(labels, ids)]
                    for name, (_, labels, ids) in splits.items()}
        # Every word a caption or prompt can use is in the vocabulary (prompts use the class names).
        texts = captions["train"] + [t.format(n) for t in CAPTION_TEMPLATES + PROMPT_TEMPLATES for n in CLASS_NAMES]
        tokenizer_lib.train_wordpiece(texts, self.data_dir, vocab_size=512)
        return {name: self._generate_examples(images, labels, ids, captions[name])
                for name, (images, labels, ids) in splits.items()}

    def _generate_examples(self, images, labels, ids, captions):
        for image, label, key, text in zip(images, labels, ids, captions):
            yield int(key), {"image": image[..., None], "label": int(label), "caption": text}


def caption(index: int, label: int) -> str:
    """The caption of digit ``index`` (a fixed draw among the templates)."""
    rng = np.random.default_rng([7, index])
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(CLASS_NAMES[label])


CANVAS, CLIP_FRAMES = 32, 16


def moving_clip(image: np.ndarray, seed: int, frames: int = CLIP_FRAMES, canvas: int = CANVAS) -> np.ndarray:
    """[frames, canvas, canvas] uint8: ``image`` moving at a seeded constant velocity (1-3 pixels per
    frame on each axis), bouncing off the canvas walls."""
    rng = np.random.default_rng([11, seed])
    size = image.shape[0]
    room = canvas - size
    pos = rng.integers(0, room + 1, size=2).astype(np.int64)
    vel = rng.integers(1, 4, size=2) * rng.choice([-1, 1], size=2)
    clip = np.zeros((frames, canvas, canvas), np.uint8)
    for t in range(frames):
        y, x = pos
        clip[t, y:y + size, x:x + size] = image
        for axis in range(2):
            nxt = pos[axis] + vel[axis]
            if nxt < 0 or nxt > room:
                vel[axis] = -vel[axis]
                nxt = pos[axis] + vel[axis]
            pos[axis] = nxt
    return clip


class MaskjaxMovingDigits(tfds.core.GeneratorBasedBuilder):
    """Moving-MNIST-style clips from the digits: ``video`` uint8 [16, 32, 32, 1], ``label`` 0-9. One
    clip per digit image (same train/test split as ``maskjax_digits``), motion seeded by its index."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "16-frame 32x32 clips, one bouncing 16x16 digit each."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn digits moving on a 32x32 canvas (Moving-MNIST style), 16 frames.",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(CLIP_FRAMES, CANVAS, CANVAS, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("video", "label"),
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(*split) for name, split in digit_splits().items()}

    def _generate_examples(self, images, labels, ids):
        for image, label, key in zip(images, labels, ids):
            yield int(key), {"video": moving_clip(image, int(key))[..., None], "label": int(label)}


def _upsample(scan: np.ndarray) -> np.ndarray:
    """8x8 scan with values 0..16 -> 16x16 uint8 (bilinear)."""
    pixels = np.clip(np.round(scan * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
