"""Masked diffusion language model (MDLM) on the embedded corpus: a small pre-norm transformer with
rotary positions (4 x 128, 64-token rows), log-linear schedule, antithetic t, about 7 minutes on 2
CPU cores (~330 ms/step: the vocabulary projection runs at every position) plus ~2 of evaluation.

maskjax train  --config configs/mdlm_text.py --workdir runs/mdlm_text
maskjax sample --workdir runs/mdlm_text --steps 64 --num 4
Variants (combine with commas): ``tiny`` (seconds, for tests), ``cosine`` (cosine schedule).
"""
from maskjax import config as config_lib
from maskjax.objectives.text import small_text_config

PAPER = "mdlm"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

VARIANTS = ("tiny", "cosine")


def get_config(arg: str = ""):
    variants = config_lib.variants(arg, VARIANTS)
    c = small_text_config("mdlm", tiny="tiny" in variants)
    if "tiny" in variants:
        c.diffusion.sample_steps = 8
    else:
        c.total_steps = 1200
        c.diffusion.sample_steps = 128
    c.model.update(positions="rotary", pre_norm=True)
    c.diffusion.update(schedule="cosine" if "cosine" in variants else "loglinear", eps=1e-3, antithetic=True)
    c.optim.schedule = "cosine"
    return c
