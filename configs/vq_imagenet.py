"""A ViT VQ tokenizer for ImageNet-1k at 256x256 with MaskGIT's token layout: a 16x16 grid of codes
from a 1,024-entry codebook, the tokens ``configs/maskgit_imagenet.py`` predicts.

maskjax train --config configs/vq_imagenet.py --workdir gs://BUCKET/vq_imagenet \\
    --config.data.data_dir=gs://BUCKET/tfds

MaskGIT's own tokenizer is a convolutional VQGAN (google-research/maskgit ``configs/vqgan_config.py``:
codebook 1,024 of 256 dimensions, downsampling 16, trained with perceptual and adversarial losses);
maskjax has no convolutional VQGAN, so this is the same token grid and codebook size from a ViT
autoencoder (patch 16, ViT-VQGAN's L2-normalised, factorised look-up with 32-dimensional codes, VQ-VAE's
commitment 0.25, the codebook learned by EMA with dead-code restarts as in ``configs/vq_digits.py``, where
the loss-learned codebook collapsed), trained on pixel MSE alone: expect blurrier reconstructions than a VQGAN's. Encoder and
decoder 8 blocks x 512 (ViT-VQGAN's "small"), batch 256, 100 epochs, AdamW (0.9, 0.99), lr 1e-4 per 256
with 5,000 warm-up steps, no weight decay, random resized crop (0.8, 1) + flip.
"""
from maskjax import objectives

PAPER = "maskgit_tokens"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"unknown variant {arg!r}; known: none")
    c = objectives.base_config("vq")
    c.batch_size = 256
    c.total_steps = 500_400  # 100 epochs of 1,281,167 images
    c.log_every = 100
    c.data.update(name="imagenet2012", image_size=256, channels=3, train_split="train", eval_split="validation",
                  crop_scale=(0.8, 1.0), flip=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_threads=16,
                  prefetch=8)
    c.model.update(patch_size=16, width=512, depth=8, heads=8, mlp_ratio=4.0, cls_token=False, dtype="bfloat16")
    c.decoder.update(width=512, depth=8, heads=8)
    c.vq.update(codebook_size=1024, code_dim=32, beta=0.25, l2_norm=True, ema=True, ema_decay=0.99, dead_threshold=1.0)
    c.loss.norm_pix = False
    c.optim.update(base_lr=1e-4, base_batch=256, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=5000,
                   schedule="cosine")
    c.checkpoint.update(every=5000, keep=3)
    c.eval.update(probe=False, batch_size=256)
    return c
