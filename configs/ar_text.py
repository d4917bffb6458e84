"""Autoregressive baseline on the embedded corpus: the same pre-norm rotary transformer, data,
packing, optimizer and step budget as ``configs/mdlm_text.py`` (4 x 128, 64-token rows, batch 32,
1200 steps), with a causal mask and the next-token loss, so the two are compared on identical data
and FLOP accounting (``maskjax/objectives/ar.py`` says which tokens and attention FLOPs each counts).

maskjax train --config configs/ar_text.py --workdir runs/ar_text
Variants: ``tiny`` (seconds, for tests).

Against the paper's AR baseline (kuleshov-group/mdlm, backbone=ar): its embeddings are untied and it
trains with dropout 0.1 and an EMA of the weights; maskjax ties them, has no dropout and evaluates
the raw weights, as for its MDLM runs.
"""
from maskjax import config as config_lib
from maskjax.objectives.text import small_text_config

PAPER = "mdlm_ar"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

VARIANTS = ("tiny",)


def get_config(arg: str = ""):
    variants = config_lib.variants(arg, VARIANTS)
    c = small_text_config("ar", tiny="tiny" in variants)
    if "tiny" not in variants:
        c.total_steps = 1200
    c.model.update(positions="rotary", pre_norm=True)
    c.optim.schedule = "cosine"
    return c
