"""Masked diffusion language model (MDLM) on the embedded corpus: a small pre-norm transformer with
rotary positions, log-linear schedule, antithetic t, about 7 minutes on 2 CPU cores (~330 ms/step).

maskjax train  --config configs/mdlm_text.py --workdir runs/mdlm_text
maskjax sample --workdir runs/mdlm_text --steps 64 --num 4
Variants: ``:tiny`` (seconds, for tests), ``:cosine`` (cosine schedule).
"""
from maskjax.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.objective = "mdlm"
    c.batch_size = 32
    c.total_steps = 1200
    c.log_every = 50
    c.data.update(name="maskjax_text", train_split="train", eval_split="validation", seq_len=64, prefetch=8)
    c.model.update(width=128, depth=4, heads=4, mlp_ratio=4.0, max_len=64, positions="rotary", pre_norm=True)
    c.diffusion.update(schedule="loglinear", eps=1e-3, antithetic=True, sample_steps=128)
    c.optim.update(base_lr=1e-3, base_batch=32, b1=0.9, b2=0.98, weight_decay=0.01, warmup_steps=100,
                   schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=500, keep=2)
    c.eval.update(batch_size=64)
    variants = arg.split(",") if arg else []
    for variant in variants:
        if variant == "tiny":
            c.batch_size = 16
            c.total_steps = 6
            c.log_every = 2
            c.data.seq_len = 32
            c.model.update(width=32, depth=2, heads=2, max_len=32)
            c.diffusion.sample_steps = 8
            c.optim.warmup_steps = 2
            c.checkpoint.every = 3
            c.eval.update(batch_size=16, max_batches=2)
        elif variant == "cosine":
            c.diffusion.schedule = "cosine"
        else:
            raise ValueError(f"unknown variant {variant!r}; known: tiny, cosine")
    return c
