"""BERT-style masked language modelling on the embedded corpus (Python's help topics and stdlib
docstrings, WordPiece 4096): a small post-norm BERT (4 x 128, learned positions, 64-token rows),
15% masking with 80/10/10, about 6 minutes on 2 CPU cores (~190 ms/step) plus ~2 of evaluation.

maskjax train --config configs/mlm_text.py --workdir runs/mlm_text
Variants (combine with commas, e.g. ``:span,tiny``): ``tiny`` (seconds, for tests), ``wwm``
(whole-word masking), ``span`` (SpanBERT spans), ``40`` (40% masking, "Should You Mask 15%?"),
``decay`` (30% -> 15% linear, Ankner et al. 2023).
"""
from maskjax import config as config_lib
from maskjax.objectives.text import small_text_config

PAPER = "bert"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

VARIANTS = ("tiny", "wwm", "span", "40", "decay")


def get_config(arg: str = ""):
    variants = config_lib.variants(arg, VARIANTS)
    c = small_text_config("mlm", tiny="tiny" in variants)
    if "tiny" not in variants:
        c.total_steps = 1500
    c.model.update(positions="learned", pre_norm=False)
    c.mask.update(kind="token", ratio=0.15, schedule="constant")
    c.mlm.update(replace=True, sparse=True)
    c.optim.schedule = "linear"
    if "wwm" in variants:
        c.mask.kind = "word"
    if "span" in variants:
        c.mask.kind = "span"
    if "40" in variants:
        c.mask.ratio = 0.4
    if "decay" in variants:
        c.mask.update(ratio=0.3, schedule="linear", final_ratio=0.15)
    c.mlm.max_predictions = max(8 if "tiny" in variants else 10, round(c.mask.ratio * c.data.seq_len))
    return c
