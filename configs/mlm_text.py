"""BERT-style masked language modelling on the embedded corpus (Python's help topics and stdlib
docstrings, WordPiece 4096), a small post-norm BERT, 15% masking with 80/10/10, about 6 minutes on
2 CPU cores.

maskjax train --config configs/mlm_text.py --workdir runs/mlm_text
Variants: ``:tiny`` (seconds, for tests), ``:wwm`` (whole-word masking), ``:span`` (SpanBERT spans),
``:40`` (40% masking, "Should You Mask 15%?"), ``:decay`` (30% -> 15% linear, Ankner et al. 2023).
"""
from maskjax.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.objective = "mlm"
    c.batch_size = 32
    c.total_steps = 1500
    c.log_every = 50
    c.data.update(name="maskjax_text", train_split="train", eval_split="validation", seq_len=64, prefetch=8)
    c.model.update(width=128, depth=4, heads=4, mlp_ratio=4.0, max_len=64, positions="learned", pre_norm=False)
    c.mask.update(kind="token", ratio=0.15, schedule="constant")
    c.mlm.update(replace=True, max_predictions=10, sparse=True)
    c.optim.update(base_lr=1e-3, base_batch=32, b1=0.9, b2=0.98, weight_decay=0.01, warmup_steps=100,
                   schedule="linear", clip_norm=1.0)
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
            c.mlm.max_predictions = 8
            c.optim.warmup_steps = 2
            c.checkpoint.every = 3
            c.eval.update(batch_size=16, max_batches=2)
        elif variant == "wwm":
            c.mask.kind = "word"
        elif variant == "span":
            c.mask.kind = "span"
        elif variant == "40":
            c.mask.ratio = 0.4
            c.mlm.max_predictions = round(0.4 * c.data.seq_len)
        elif variant == "decay":
            c.mask.update(ratio=0.3, schedule="linear", final_ratio=0.15)
            c.mlm.max_predictions = round(0.3 * c.data.seq_len)
        else:
            raise ValueError(f"unknown variant {variant!r}; known: tiny, wwm, span, 40, decay")
    return c
