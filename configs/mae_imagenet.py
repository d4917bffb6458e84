"""MAE on ImageNet-1k at 224 (He et al. 2021), the paper's recipe.

maskjax train --config configs/mae_imagenet.py:vit_b16 --workdir gs://BUCKET/mae_b16 \\
    --config.data.data_dir=gs://BUCKET/tfds
Variants: vit_b16 (default), vit_l16, vit_h14. Needs `imagenet2012` prepared in ``data.data_dir``
as array_record (``tfds build imagenet2012 --file_format=array_record``; the archives must be
downloaded by hand), or in TFRecord format and converted once with ``maskjax data convert --name
imagenet2012 --data_dir DIR``. A gs:// data_dir is copied to each host's disk on first use.

Paper values: batch 4096, base lr 1.5e-4 (lr = base_lr * batch / 256), AdamW (0.9, 0.95),
weight decay 0.05, 40 warm-up epochs of 800 (1600 for the best numbers), cosine, mask 0.75,
norm-pix loss (unbiased variance, as ``torch.var``), decoder 8 blocks x 512, random resized crop
(0.2, 1) + flip. Weight decay on every weight matrix (``optim.decay_roles``), none on biases, norms,
the cls and mask tokens or positions; ``maskjax params`` lists it per parameter.

Checked against the official code (tests/test_equivalence.py: loss, gradients and AdamW steps equal to
transformers' ViTMAEForPreTraining and torch.optim.AdamW with ``util/lr_sched.py``'s schedule). One
deviation remains: ``main_pretrain.py`` builds its groups with timm's ``add_weight_decay`` (no decay
only for 1-D tensors and biases), which also decays the [1, 1, D] cls and mask tokens; we follow the
papers' stated rule and MAE's own fine-tuning code (``param_groups_lrd`` exempts cls_token and
pos_embed). Add ``token`` to ``optim.decay_roles`` to match the pretraining script exactly.
"""
from maskjax import objectives
from maskjax.config import steps_for_epochs

PAPER = "mae"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

IMAGENET_TRAIN = 1_281_167
VARIANTS = {
    "vit_b16": dict(patch_size=16, width=768, depth=12, heads=12),
    "vit_l16": dict(patch_size=16, width=1024, depth=24, heads=16),
    "vit_h14": dict(patch_size=14, width=1280, depth=32, heads=16),
}


def get_config(arg: str = "vit_b16"):
    arg = arg or "vit_b16"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; known: {sorted(VARIANTS)}")
    c = objectives.base_config("mae")
    c.batch_size = 4096
    epochs, warmup_epochs = 800, 40
    c.total_steps = steps_for_epochs(epochs, IMAGENET_TRAIN, c.batch_size)
    c.log_every = 100
    c.data.update(name="imagenet2012", image_size=224, channels=3, train_split="train",
                  eval_split="validation", crop_scale=(0.2, 1.0), flip=True,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_threads=16, prefetch=8)
    c.model.update(mlp_ratio=4.0, cls_token=True, qkv_bias=True, dtype="bfloat16", remat="none", **VARIANTS[arg])
    c.decoder.update(width=512, depth=8, heads=16)
    c.mask.update(kind="random", ratio=0.75)
    c.loss.norm_pix = True
    c.optim.update(base_lr=1.5e-4, base_batch=256, b1=0.9, b2=0.95, weight_decay=0.05,
                   warmup_steps=steps_for_epochs(warmup_epochs, IMAGENET_TRAIN, c.batch_size),
                   schedule="cosine")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(probe=False, batch_size=1024)
    return c
