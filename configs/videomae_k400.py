"""VideoMAE on Kinetics-400 (Tong et al. 2022), ViT-B or ViT-L, 16 frames at stride 4, 224 pixels.

maskjax train --config configs/videomae_k400.py:vit_b --workdir gs://BUCKET/videomae_b
Variants: vit_b (default), vit_l; ``,st`` for MAE-ST (spatiotemporal random masking at 0.9,
decoder 4 x 512); ``,dual`` for VideoMAE V2's dual masking (the decoder keeps 50% of the tokens).

Data: ``data.name`` must be a TFDS video dataset prepared as array_record (``maskjax data convert`` turns a
TFRecord-format one into that; a gs:// ``data.data_dir`` is copied to each host) whose ``video`` field
decodes to uint8 [T, H, W, 3] (e.g. a Kinetics-400 builder of your own; clips shorter than
16 x 4 frames are an error naming the record).

From the paper: tubelets 2x16x16, tube masking 0.9, decoder 4 blocks x 384, MSE on pixels standardised
per channel within each tubelet (MCG-NJU/VideoMAE ``engine_for_pretraining.py``; MAE-ST per patch),
lr 1.5e-4 x batch / 256, AdamW (0.9, 0.95), weight decay 0.05, 40 warm-up epochs, 800 epochs
(1600 for the best numbers), multi-scale crop + flip. From the code (``modeling_pretrain.py``,
``run_mae_pretraining.py``, ``optim_factory.py``, ``utils.py::cosine_scheduler``): q/v biases, no cls
token, one sinusoid table over the flattened token index, ``encoder_to_decoder`` without bias, LayerNorm
eps 1e-6, min lr 1e-5 x batch / 256, warm-up ``np.linspace(0, lr, warmup_iters)``, no weight decay on
1-D tensors, biases and the mask token. tests/test_equivalence.py checks the model against
transformers' ``VideoMAEForPreTraining`` and six optimizer steps against torch's AdamW with these
groups and that schedule. Ours: the batch of 512 and random resized crop (0.5, 1) in place of the
multi-scale crop; a key bias exists (it changes no attention weight, and stays at its zero gradient).
"""
from maskjax import objectives
from maskjax.config import steps_for_epochs, variants

PAPER = "videomae"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

K400_TRAIN = 240_436
SIZES = {"vit_b": dict(width=768, depth=12, heads=12), "vit_l": dict(width=1024, depth=24, heads=16)}


def get_config(arg: str = "vit_b"):
    chosen = variants(arg or "vit_b", tuple(SIZES) + ("st", "dual"))
    sizes = [v for v in chosen if v in SIZES] or ["vit_b"]
    if len(sizes) > 1:
        raise ValueError(f"choose one model size of {sorted(SIZES)}")
    c = objectives.base_config("mae")
    c.batch_size = 512
    epochs, warmup_epochs = 800, 40
    c.total_steps = steps_for_epochs(epochs, K400_TRAIN, c.batch_size)
    c.log_every = 100
    c.data.update(name="kinetics400", image_key="video", frames=16, frame_stride=4, image_size=224, channels=3,
                  train_split="train", eval_split="validation", crop_scale=(0.5, 1.0), flip=True,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_threads=32, prefetch=4)
    c.model.update(patch_size=16, tubelet=2, mlp_ratio=4.0, cls_token=False, qkv_bias=True, dtype="bfloat16",
                   remat="dots",
                   **SIZES[sizes[0]])
    c.decoder.update(width=384, depth=4, heads=6)
    c.mask.update(kind="tube", ratio=0.9)
    # VideoMAE standardises each channel within a tubelet (engine_for_pretraining.py); MAE-ST each patch
    c.loss.update(norm_pix=True, norm_pix_mode="channel")
    # VideoMAE's layout (modeling_pretrain.py): one sinusoid table over the flattened token index in the
    # encoder and the decoder, no cls token, encoder_to_decoder without bias; its q/v biases are
    # model.qkv_bias (a key bias changes no attention weight)
    c.model.update(pos_embed="sincos_1d", cls_token=False)
    c.decoder.embed_bias = False
    # run_mae_pretraining.py: lr 1.5e-4 and min_lr 1e-5, both x batch / 256; utils.cosine_scheduler's
    # warm-up is np.linspace(0, lr, warmup_iters); optim_factory: no decay on 1-D tensors, biases, mask_token
    c.optim.update(base_lr=1.5e-4, base_batch=256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                   warmup_steps=steps_for_epochs(warmup_epochs, K400_TRAIN, c.batch_size), schedule="cosine",
                   min_lr_ratio=1e-5 / 1.5e-4, warmup_linspace=True)
    c.checkpoint.update(every=1000, keep=3)
    c.eval.update(probe=False, num_images=4, batch_size=64)
    if "st" in chosen:
        c.mask.kind = "spatiotemporal"
        c.loss.norm_pix_mode = "patch"
        # MAE-ST (facebookresearch/mae_st): separable space-time positions (learned there, fixed sin-cos
        # here) and a biased decoder projection, as MAE's
        c.model.pos_embed = "sincos"
        c.decoder.embed_bias = True
        c.decoder.update(width=512, depth=4, heads=16)
    if "dual" in chosen:
        c.mask.decoder_ratio = 0.5
    return c
