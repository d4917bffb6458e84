"""Datasets (TFDS builders for embedded data), tokenizers and the Grain / text input pipelines."""
from maskjax.data.pipeline import Loader, eval_batches
from maskjax.data.sources import DataError, builder, source
from maskjax.data.tokenizer import TokenizerError


def train_loader(config, rows=None, kind: str = "image"):
    """Endless local batches with ``get_state``/``set_state``: images or videos (Grain), images with
    tokenized captions ('image_text'), or packed text. ``rows``: this process's rows of each global
    batch (``sharding.process_rows``; default all)."""
    if kind == "text":
        from maskjax.data import text

        return text.train_loader(config, rows)
    from maskjax.data import pipeline

    return pipeline.train_loader(config, rows, captions=kind == "image_text")
