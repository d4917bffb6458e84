"""MAGE on the embedded digits: masked token modelling with a variable mask ratio and an MAE-style
encoder-decoder over the codes of the VQ tokenizer of ``configs/vq_digits.py``; one model that both
generates digits (unconditionally) and encodes them (linear probe and k-NN of its encoder).

maskjax train --config configs/vq_digits.py --workdir runs/vq_digits          # the tokenizer, first
maskjax train --config configs/mage_digits.py --workdir runs/mage_digits --config.mage.tokenizer=runs/vq_digits
Variants: ``:tiny`` (seconds; a random frozen tokenizer of ``configs/vq_digits.py:tiny``, for tests).

The method as in the paper (mask ratio from a normal(0.55, 0.25) truncated to [0.5, 1], half the
tokens dropped from the encoder, label smoothing 0.1, AdamW betas (0.9, 0.95), weight decay 0.05),
scaled to the digits: encoder 4 x 128, decoder 2 x 128 (the paper's ViT-B: 12 x 768 and 8 x 768),
batch 128, 1,000 steps with 50 warm-up, learning rate 1e-3 (per 256: 2e-3).
"""
import os

from maskjax import objectives

PAPER = "mage"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("mage")
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.data.crop_scale = (1.0, 1.0)
    c.data.flip = False
    c.model.update(width=128, depth=4, heads=4, mlp_ratio=4.0)
    c.decoder.update(width=128, depth=2, heads=4)
    c.mage.update(tokenizer="runs/vq_digits", ratio_min=0.5, ratio_max=1.0, ratio_mean=0.55, ratio_std=0.25,
                  label_smoothing=0.1)
    c.generate.update(schedule="cosine", steps=8, choice_temperature=4.5, eval_samples=500)
    c.optim.update(base_lr=2e-3, base_batch=256, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=50,
                   schedule="cosine")
    c.checkpoint.update(every=500, keep=2)
    if arg == "tiny":
        c.batch_size = 16
        c.total_steps = 8
        c.log_every = 2
        c.model.update(width=32, depth=2, heads=2)
        c.decoder.update(width=32, depth=1, heads=2)
        c.mage.update(tokenizer="", tokenizer_config=os.path.join(os.path.dirname(__file__), "vq_digits.py:tiny"))
        c.generate.update(steps=4, eval_samples=40)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return c
