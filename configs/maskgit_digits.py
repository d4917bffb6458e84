"""MaskGIT on the embedded digits: a class-conditional token transformer over the codes of the VQ
tokenizer of ``configs/vq_digits.py`` (an 8x8 grid of codes per 16x16 digit).

maskjax train --config configs/vq_digits.py --workdir runs/vq_digits          # the tokenizer, first
maskjax train --config configs/maskgit_digits.py --workdir runs/maskgit_digits \\
    --config.maskgit.tokenizer=runs/vq_digits
maskjax sample --workdir runs/maskgit_digits --num 100 --steps 8
Variants: ``:tiny`` (seconds; a random frozen tokenizer of ``configs/vq_digits.py:tiny``, for tests).

The method as in ``configs/maskgit_imagenet.py`` (cosine schedule, label smoothing 0.1, class token
with 10% label drop, Adam betas (0.9, 0.96), decoding with choice temperature 4.5), scaled to the
digits: BERT-style post-norm blocks 4 x 128 (the paper: 24 x 768), batch 128, 1,000 steps with 50
warm-up, learning rate 1e-3 (per 256: 2e-3; the paper's 1e-4 at batch 256 is for 1.5M steps).
No crops or flips: a generator should learn whole, upright digits.
"""
import os

from maskjax import objectives

PAPER = "maskgit"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("maskgit")
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.data.crop_scale = (1.0, 1.0)
    c.data.flip = False
    c.model.update(width=128, depth=4, heads=4, mlp_ratio=4.0, norm_eps=1e-12)
    c.maskgit.update(tokenizer="runs/vq_digits", class_conditional=True, num_classes=10, label_drop=0.1,
                     label_smoothing=0.1)
    c.generate.update(schedule="cosine", steps=8, choice_temperature=4.5, guidance=0.0, eval_samples=500)
    c.optim.update(base_lr=2e-3, base_batch=256, b1=0.9, b2=0.96, weight_decay=0.045, warmup_steps=50,
                   schedule="cosine", decay_roles=("kernel",))
    c.checkpoint.update(every=500, keep=2)
    c.eval.probe = False
    if arg == "tiny":
        c.batch_size = 16
        c.total_steps = 8
        c.log_every = 2
        c.model.update(width=32, depth=2, heads=2)
        c.maskgit.update(tokenizer="", tokenizer_config=os.path.join(os.path.dirname(__file__), "vq_digits.py:tiny"))
        c.generate.update(steps=4, eval_samples=40)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return c
