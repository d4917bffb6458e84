"""Datasets (TFDS builders for embedded data) and the Grain input pipeline."""
from maskjax.data.pipeline import DataError, Loader, builder, eval_batches, source, train_loader
