"""SimMIM on the embedded digits: full sequence + mask token, 8-pixel cells (2x2 patches), L1.

maskjax train --config configs/simmim_digits.py --workdir runs/simmim_digits
"""
from maskjax import objectives

PAPER = "simmim"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("simmim")
    c.batch_size = 128
    c.total_steps = 2000
    c.data.crop_scale = (0.6, 1.0)
    c.data.flip = False
    c.model.update(patch_size=4, width=128, depth=4, heads=4)
    c.mask.update(kind="grid", ratio=0.6, cell=2)
    c.optim.update(base_lr=4e-3, base_batch=512, b1=0.9, b2=0.999, warmup_steps=100, clip_norm=5.0)
    if arg == "tiny":
        c.batch_size = 32
        c.total_steps = 8
        c.log_every = 2
        c.model.update(width=32, depth=2, heads=2)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return c
