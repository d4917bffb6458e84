"""Default run: MAE on the embedded digits dataset (16x16 grey scans), ~4 minutes on 2 CPU cores.

maskjax train --config configs/mae_digits.py --workdir runs/mae_digits
Variants: ``:tiny`` (a few seconds, for tests and smoke runs).
"""
from maskjax import objectives

PAPER = "mae"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("mae")
    c.batch_size = 128
    c.total_steps = 2000
    c.log_every = 50
    # Digits are centred and small: mild crops, no flips (a flipped 2 is not a digit).
    c.data.crop_scale = (0.6, 1.0)
    c.data.flip = False
    c.model.update(patch_size=4, width=128, depth=4, heads=4, mlp_ratio=4.0)
    c.decoder.update(width=64, depth=2, heads=4)
    c.mask.update(kind="random", ratio=0.75)
    c.loss.norm_pix = True
    c.optim.update(base_lr=2e-3, base_batch=256, warmup_steps=100, weight_decay=0.05)
    c.checkpoint.update(every=500, keep=2)
    if arg == "tiny":
        c.batch_size = 32
        c.total_steps = 8
        c.log_every = 2
        c.model.update(width=32, depth=2, heads=2)
        c.decoder.update(width=32, depth=1, heads=2)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 4
        c.eval.num_images = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return c
