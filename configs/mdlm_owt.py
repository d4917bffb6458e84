"""MDLM recipe (Sahoo et al. 2024, kuleshov-group/mdlm): 12 layers x 768 pre-norm transformer with
rotary positions, sequence length 1024, batch 512, AdamW lr 3e-4 with 2,500 warm-up steps then
constant, log-linear schedule, antithetic t, 1M steps.

OpenWebText is not in the TFDS catalog, so the default data is C4 (``c4/en``, prepare it with
``tfds build c4/en --file_format array_record``); a user-built TFDS OpenWebText works with
``--config.data.name=openwebtext``. Variant ``:lm1b`` is the paper's LM1B setup (sequence 128).
The tokenizer is a file you supply (SentencePiece .model or WordPiece vocab.txt with a mask token):

  maskjax train --config configs/mdlm_owt.py --workdir runs/mdlm_owt --config.data.tokenizer=/path/to/spm.model

Not in this recipe: dropout 0.1 and the EMA of weights (0.9999) that the paper uses.
"""
from maskjax import objectives

PAPER = "mdlm"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("mdlm")
    c.batch_size = 512
    c.total_steps = 1_000_000
    c.log_every = 100
    c.data.update(name="c4/en", train_split="train", eval_split="validation", text_key="text", seq_len=1024,
                  prefetch=8)
    c.model.update(width=768, depth=12, heads=12, mlp_ratio=4.0, max_len=1024, positions="rotary",
                   pre_norm=True, dtype="bfloat16", remat="dots")
    c.diffusion.update(schedule="loglinear", eps=1e-3, antithetic=True, sample_steps=1000)
    c.optim.update(base_lr=3e-4, base_batch=512, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=2500,
                   schedule="constant", clip_norm=1.0)
    c.checkpoint.update(every=10_000, keep=3)
    c.eval.update(batch_size=512, max_batches=100)
    if arg == "lm1b":
        c.data.update(name="lm1b", eval_split="test", seq_len=128)
        c.model.max_len = 128
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: lm1b")
    return c
