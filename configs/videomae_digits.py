"""VideoMAE on the embedded moving digits (16-frame 32x32 clips of a bouncing digit): 4 frames two
apart, 2x4x4 tubelets (2 x 8 x 8 = 128 tokens), tube masking at 0.9, a 4-block decoder,
normalised-pixel targets. Writes a PNG strip of input / masked / reconstructed frames at the end.
About 5 minutes on 2 CPU cores (the decoder over all 128 tokens is most of the cost).

maskjax train --config configs/videomae_digits.py --workdir runs/videomae_digits
Variants (comma-separated): ``tiny`` (seconds, for tests), ``st`` (MAE-ST: spatiotemporal random
masking), ``dual`` (VideoMAE V2: the decoder drops half its tokens with a running-cell mask).
"""
from maskjax import objectives
from maskjax.config import variants

PAPER = "videomae"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    chosen = variants(arg, ("tiny", "st", "dual"))
    c = objectives.base_config("mae")
    c.batch_size = 16
    c.total_steps = 800
    c.log_every = 25
    c.data.update(name="maskjax_moving_digits", image_key="video", frames=4, frame_stride=2, image_size=32, channels=1,
                  crop_scale=(0.7, 1.0), flip=False)
    c.model.update(patch_size=4, tubelet=2, width=128, depth=4, heads=4, mlp_ratio=4.0)
    c.decoder.update(width=64, depth=4, heads=4)
    c.mask.update(kind="tube", ratio=0.9)
    # VideoMAE standardises each channel within a tubelet (engine_for_pretraining.py); MAE-ST each patch
    c.loss.update(norm_pix=True, norm_pix_mode="channel")
    # VideoMAE's layout (modeling_pretrain.py): one sinusoid table over the flattened token index in the
    # encoder and the decoder, no cls token, encoder_to_decoder without bias; its q/v biases are
    # model.qkv_bias (a key bias changes no attention weight)
    c.model.update(pos_embed="sincos_1d", cls_token=False)
    c.decoder.embed_bias = False
    c.optim.update(base_lr=1e-3, base_batch=16, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=80)
    c.checkpoint.update(every=400, keep=2)
    c.eval.update(batch_size=128, num_images=4)
    if "st" in chosen:
        c.mask.kind = "spatiotemporal"
        c.loss.norm_pix_mode = "patch"
        # MAE-ST (facebookresearch/mae_st): separable space-time positions (learned there, fixed sin-cos
        # here) and a biased decoder projection, as MAE's
        c.model.pos_embed = "sincos"
        c.decoder.embed_bias = True
    if "dual" in chosen:
        c.mask.decoder_ratio = 0.5
    if "tiny" in chosen:
        c.update(batch_size=8, total_steps=6, log_every=2)
        c.data.update(frames=4, frame_stride=1, image_size=16)
        c.model.update(width=32, depth=1, heads=2)
        c.decoder.update(width=32, depth=1, heads=2)
        c.optim.warmup_steps = 2
        c.checkpoint.every = 3
        c.eval.update(batch_size=32, max_batches=0)
    return c
