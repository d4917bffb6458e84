"""ELECTRA on the embedded corpus (Python's help topics and stdlib docstrings, WordPiece 4096): a
small post-norm discriminator (4 x 128, learned positions, 64-token rows) and a generator of a
quarter of its width sharing its embeddings, 15% masking (85% [MASK], 15% kept), loss = MLM + 50 x
replaced-token detection; the same data, packing and optimizer as ``configs/mlm_text.py``, so the two
are compared on equal terms.

maskjax train --config configs/electra_text.py --workdir runs/electra_text
Variants: ``tiny`` (seconds, for tests).
"""
from maskjax import config as config_lib
from maskjax.objectives.text import small_text_config

PAPER = "electra_small"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

VARIANTS = ("tiny",)


def get_config(arg: str = ""):
    variants = config_lib.variants(arg, VARIANTS)
    c = small_text_config("electra", tiny="tiny" in variants)
    if "tiny" not in variants:
        c.total_steps = 1500
    c.model.update(positions="learned", pre_norm=False)
    c.mask.update(kind="token", ratio=0.15, schedule="constant")
    c.mlm.update(sparse=True, max_predictions=8 if "tiny" in variants else 10)
    c.electra.update(generator_ratio=0.25, embed_dim=0, disc_weight=50.0, temperature=1.0, mask_share=0.85)
    c.optim.schedule = "linear"
    return c
