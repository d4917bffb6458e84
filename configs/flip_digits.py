"""FLIP on the embedded captioned digits: image tower on half the patches, text tower on captions
("a scan of a handwritten seven"), contrastive loss over the global batch; zero-shot accuracy on the
test split at the end (chance 10%). A few minutes on 2 CPU cores.

maskjax train --config configs/flip_digits.py --workdir runs/flip_digits
Variants: ``:tiny`` (seconds, for tests), ``:unmasked`` (mask ratio 0: FLIP's unmasked tuning, or
the CLIP baseline when trained from scratch), ``:textmask`` (also drop half the caption's words).
"""
from maskjax import objectives
from maskjax.config import variants
from maskjax.data.digits import PROMPT_TEMPLATES

PAPER = "flip"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    chosen = variants(arg, ("tiny", "unmasked", "textmask"))
    c = objectives.base_config("flip")
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.data.update(name="maskjax_digit_captions", text_key="caption", seq_len=16,
                  crop_scale=(0.6, 1.0), flip=False)  # a flipped 2 is not a two
    c.model.update(patch_size=4, width=128, depth=4, heads=4, mlp_ratio=4.0)
    c.text_model.update(width=64, depth=2, heads=4, mlp_ratio=4.0)
    c.mask.update(kind="random", ratio=0.5)
    c.flip.update(embed_dim=64, init_temperature=0.07, max_logit_scale=100.0, text_mask_ratio=0.0)
    c.optim.update(base_lr=1e-3, base_batch=128, b1=0.9, b2=0.95, weight_decay=0.2, warmup_steps=100)
    c.checkpoint.update(every=500, keep=2)
    # Prompts differ from the caption templates, so zero-shot is not reading back a training caption.
    c.eval.update(prompts=PROMPT_TEMPLATES, batch_size=256, num_images=0)
    if "unmasked" in chosen:
        c.mask.ratio = 0.0
    if "textmask" in chosen:
        c.flip.text_mask_ratio = 0.5
    if "tiny" in chosen:
        c.update(batch_size=32, total_steps=6, log_every=2)
        c.model.update(width=32, depth=2, heads=2)
        c.text_model.update(width=32, depth=1, heads=2)
        c.flip.embed_dim = 16
        c.optim.warmup_steps = 2
        c.checkpoint.every = 3
    return c
