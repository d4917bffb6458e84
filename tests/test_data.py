"""The embedded TFDS builder and the Grain pipeline: splits, determinism, process sharding, resume."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from maskjax.data import pipeline, sources
from tests.conftest import load_config


def test_digits_builder_splits_and_features(data_dir):
    b = tfds.builder("maskjax_digits", data_dir=data_dir)
    assert b.info.splits["train"].num_examples == 1437
    assert b.info.splits["test"].num_examples == 360
    src = tfds.data_source("maskjax_digits", data_dir=data_dir, split="test")
    labels = np.array([src[i]["label"] for i in range(len(src))])
    assert set(labels) == set(range(10))
    assert np.bincount(labels).min() >= 34, "stratified split keeps every class"
    image = src[0]["image"]
    assert image.shape == (16, 16, 1) and image.dtype == np.uint8 and image.max() > 100


def test_train_batches_shapes_and_normalisation(data_dir):
    config = load_config("mae_digits.py", data_dir=data_dir)
    batch = next(pipeline.train_loader(config))
    assert batch["image"].shape == (128, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert -1.0 - 1e-6 <= batch["image"].min() and batch["image"].max() <= 1.0 + 1e-6


def test_same_global_batches_for_any_process_count(data_dir):
    config = load_config("mae_digits.py", data_dir=data_dir)
    whole = pipeline.train_loader(config)
    parts = [pipeline.train_loader(config, sources.block_rows(config.batch_size, p, 4)) for p in range(4)]
    odd = np.arange(1, config.batch_size, 2)  # a mesh may give a process rows that are not one block
    strided = pipeline.train_loader(config, odd)
    for _ in range(3):  # includes augmentation: seeded by global position
        expected = next(whole)
        got = [next(p) for p in parts]
        np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), expected["image"])
        np.testing.assert_array_equal(next(strided)["image"], expected["image"][odd])


def test_epochs_cover_the_dataset_and_reshuffle(data_dir):
    config = load_config("mae_digits.py", "batch_size=479", "data.crop_scale=(1.0, 1.0)", data_dir=data_dir)
    loader = pipeline.train_loader(config)
    order = sources.GlobalOrder(1437, config.seed, shuffle=True)
    first, second = order(np.arange(1437)), order(np.arange(1437, 2874))
    assert sorted(first) == list(range(1437)) and sorted(second) == list(range(1437))
    assert not np.array_equal(first, second)
    assert next(loader)["image"].shape[0] == 479


def test_loader_state_resumes_exactly(data_dir):
    config = load_config("mae_digits.py", data_dir=data_dir)
    loader = pipeline.train_loader(config)
    for _ in range(5):
        next(loader)
    state = loader.get_state()
    expected = [next(loader)["image"] for _ in range(2)]
    resumed = pipeline.train_loader(config)
    resumed.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(resumed)["image"], e)


def test_eval_batches_cover_the_split_once_in_order(data_dir):
    config = load_config("mae_digits.py", data_dir=data_dir)
    seen = 0
    labels = []
    for batch, real in pipeline.eval_batches(config, "test", 128):
        assert batch["image"].shape[0] == 128
        labels.extend(batch["label"][:real])
        seen += real
    src = tfds.data_source("maskjax_digits", data_dir=data_dir, split="test")
    assert seen == 360 and labels == [src[i]["label"] for i in range(360)]


@pytest.mark.parametrize("overrides,match", [
    (["data.name=mnist"], "'mnist' is not prepared in data_dir"),
    (["data.name=no_such_dataset_xyz"], "not a TFDS dataset"),
    (["data.train_split=validation"], "no split 'validation'"),
    (["data.channels=3"], "does not have data.channels=3"),
])
def test_data_errors_name_the_problem(data_dir, overrides, match):
    config = load_config("mae_digits.py", *overrides, data_dir=data_dir)
    with pytest.raises(sources.DataError, match=match):
        next(pipeline.train_loader(config))
