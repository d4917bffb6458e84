"""data2vec 2.0 on ImageNet-1k at 224 (Baevski et al. 2022), the paper's ViT-B/16 recipe.

maskjax train --config configs/data2vec_imagenet.py:vit_b16 --workdir gs://BUCKET/d2v_b16 \\
    --config.data.data_dir=gs://BUCKET/tfds
Needs `imagenet2012` prepared in ``data.data_dir`` as array_record (or TFRecord converted once with
``maskjax data convert --name imagenet2012 --data_dir DIR``); a gs:// data_dir is copied to each
host's disk on first use.

Every value is fairseq's ``examples/data2vec/config/v2/base_images_only_task.yaml`` (and the
defaults it leaves to ``models/data2vec2.py``, ``models/modalities/{base,images,modules}.py``,
``data/mae_image_dataset.py``): 16 GPUs x 16 images = batch 256, 375,300 updates (75 epochs; each
image is seen with 16 masks), Adam (0.9, 0.95), lr 1e-3, weight decay 0.05 on everything but 1-D
tensors and biases (so on the cls token too: ``optim.decay_roles`` kernel + token), cosine schedule
with 50,040 warm-up updates, gradient clipping at 4; 12 post-norm blocks (fairseq's 2 "prenet" blocks
plus 10, ``layer_norm_first`` false) with q/k/v biases, LayerNorm eps 1e-6, fixed 2-D sin-cos
positions, a cls token; targets averaged over the top 10 blocks (all 10 after the prenet), each
instance-normalised, then layer-normalised; EMA decay 0.9998 -> 0.99999 over 100,000 updates, the
teacher being the whole encoder (``ema_encoder_only`` false, ``ema_local_encoder`` true); inverse
block masking 0.8 with 3x3 blocks and adjust 0.07; 6-layer convolutional decoder (768 channels, 16
groups, kernel 3); cls loss 0.01 (``data2vec.cls_weight`` 2.56: see its meaning in
docs/reference/config.md); random resized crop (0.2, 1) + flip.

Not reproduced: fairseq initialises the encoder with BERT's N(0, 0.02) (``init_bert_params``) and the
cls token with N(0, 1); maskjax's layers use Xavier-uniform and N(0, 0.02). fairseq trains in fp16 with
a loss scaler; this recipe uses bfloat16 compute with float32 parameters.
"""
from maskjax import objectives

PAPER = "data2vec2"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = "vit_b16"):
    arg = arg or "vit_b16"
    if arg != "vit_b16":
        raise ValueError(f"unknown variant {arg!r}; known: vit_b16")
    c = objectives.base_config("data2vec")
    c.batch_size = 256
    c.total_steps = 375_300
    c.log_every = 100
    c.data.update(name="imagenet2012", image_size=224, channels=3, train_split="train",
                  eval_split="validation", crop_scale=(0.2, 1.0), flip=True,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_threads=16, prefetch=8)
    c.model.update(patch_size=16, width=768, depth=12, heads=12, mlp_ratio=4.0, cls_token=True, qkv_bias=True,
                   pre_norm=False, norm_eps=1e-6, dtype="bfloat16", remat="none")
    c.mask.update(kind="inverse_block", ratio=0.8, block_length=3, block_adjust=0.07)
    c.optim.update(base_lr=1e-3, base_batch=256, b1=0.9, b2=0.95, weight_decay=0.05, clip_norm=4.0,
                   warmup_steps=50_040, schedule="cosine", decay_roles=("kernel", "token"))
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(probe=False, batch_size=1024)
    return c
