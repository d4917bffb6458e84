"""MaskGIT on ImageNet-1k at 256x256, class-conditional (Chang et al. 2022): the paper's transformer
and training recipe over the tokens of a maskjax VQ tokenizer (``configs/vq_imagenet.py``).

maskjax train --config configs/vq_imagenet.py --workdir gs://BUCKET/vq_imagenet ...     # the tokenizer, first
maskjax train --config configs/maskgit_imagenet.py --workdir gs://BUCKET/maskgit_imagenet \\
    --config.maskgit.tokenizer=gs://BUCKET/vq_imagenet --config.data.data_dir=gs://BUCKET/tfds
maskjax sample --workdir gs://BUCKET/maskgit_imagenet --num 64 --class 207 --steps 8

Values from google-research/maskgit ``configs/maskgit_class_cond_config.py`` (and the paper): batch 256,
Adam betas (0.9, 0.96), lr 1e-4 with 5,000 warm-up steps, weight decay 0.045, label smoothing 0.1, 24
post-norm blocks of 768 with 16 heads and MLP 3,072, a class token (1,000 classes), cosine mask
schedule; sampling with choice temperature 4.5 (the config's ``sample_choice_temperature``; the paper's
FID 6.06 is at 8 steps, the config's default is 12). 300 epochs (the paper) of 1,281,167 images.

Not reproduced: dropout 0.1 (maskjax models have none), the convolutional VQGAN tokenizer (see
``configs/vq_imagenet.py``), and classifier-free guidance's label drop is kept at 0.1 for ``maskjax
sample --guidance`` (the original MaskGIT trains without it; set ``maskgit.label_drop=0`` for that).
Without ``maskgit.tokenizer`` the tokenizer is ``configs/vq_imagenet.py`` at a random initialisation
(benchmarks and compile checks only).
"""
import os

from maskjax import objectives

PAPER = "maskgit"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"unknown variant {arg!r}; known: none")
    c = objectives.base_config("maskgit")
    c.batch_size = 256
    c.total_steps = 1_501_367  # 300 epochs
    c.log_every = 100
    c.data.update(name="imagenet2012", image_size=256, channels=3, train_split="train", eval_split="validation",
                  crop_scale=(0.8, 1.0), flip=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_threads=16,
                  prefetch=8)
    c.model.update(width=768, depth=24, heads=16, mlp_ratio=4.0, norm_eps=1e-12, dtype="bfloat16")
    c.maskgit.update(tokenizer="", tokenizer_config=os.path.join(os.path.dirname(__file__), "vq_imagenet.py"),
                     class_conditional=True, num_classes=1000, label_drop=0.1, label_smoothing=0.1)
    c.generate.update(schedule="cosine", steps=12, choice_temperature=4.5, guidance=0.0, eval_samples=0)
    c.optim.update(base_lr=1e-4, base_batch=256, b1=0.9, b2=0.96, weight_decay=0.045, warmup_steps=5000,
                   schedule="cosine")
    c.checkpoint.update(every=5000, keep=3)
    c.eval.update(probe=False, batch_size=256)
    return c
