"""A VQ tokenizer on the embedded digits (16x16 grey scans, 2x2 patches: an 8x8 grid of codes), the
tokenizer masked generative models predict.

maskjax train --config configs/vq_digits.py --workdir runs/vq_digits
Variants: ``:tiny`` (seconds, for tests and smoke runs).

VQ-VAE's reconstruction and 0.25 x commitment losses with straight-through gradients and the codebook
learned by exponential moving averages (decay 0.99; the VQ-VAE paper's appendix), codes whose average
use falls below once per step restarted at batch vectors; a 3-block ViT encoder of width 128 and a
2-block decoder, 128 codes of 8 dimensions, L2-normalised (ViT-VQGAN's look-up; the VQ-VAE example's
512 of 64 is for ImageNet-scale images), no crops (a tokenizer should see whole digits), batch 64,
1,000 steps. Measured (2 Intel Xeon cores, 5m50s): reconstruction MSE 0.0046, code perplexity 105 of
128; with the codebook loss instead of the EMA and no restarts (``--config.vq.ema=False
--config.vq.dead_threshold=0``): MSE 0.014, perplexity 5.8 (codebook collapse).
"""
from maskjax import objectives

PAPER = "vq"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    c = objectives.base_config("vq")
    c.batch_size = 64
    c.total_steps = 1000
    c.log_every = 50
    c.data.crop_scale = (1.0, 1.0)
    c.data.flip = False
    c.model.update(patch_size=2, width=128, depth=3, heads=4, mlp_ratio=4.0, cls_token=False)
    c.decoder.update(width=128, depth=2, heads=4)
    c.vq.update(codebook_size=128, code_dim=8, beta=0.25, l2_norm=True, ema=True, ema_decay=0.99,
                dead_threshold=1.0)
    c.loss.norm_pix = False
    c.optim.update(base_lr=2e-3, base_batch=256, warmup_steps=100, weight_decay=0.0)
    c.checkpoint.update(every=500, keep=2)
    if arg == "tiny":
        c.batch_size = 32
        c.total_steps = 8
        c.log_every = 2
        c.model.update(width=32, depth=2, heads=2)
        c.decoder.update(width=32, depth=1, heads=2)
        c.vq.update(codebook_size=16, code_dim=8, l2_norm=False, ema=False, dead_threshold=0.0)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 4
        c.eval.num_images = 4
    elif arg:
        raise ValueError(f"unknown variant {arg!r}; known: tiny")
    return c
