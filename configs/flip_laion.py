"""FLIP at scale (Li et al. 2023): ViT-B/16 or ViT-L/16 image tower on 50% of the patches, a
12-layer text tower, contrastive loss over a 32k global batch.

maskjax train --config configs/flip_laion.py:vit_l16 --workdir gs://BUCKET/flip_l16 \\
    --config.data.manual_dir=/data/laion400m_pairs
Variants: vit_b16 (default), vit_l16; add ``,unmasked`` for FLIP's unmasked tuning (mask ratio 0;
resume the pretraining workdir with it and a larger ``total_steps``).

Data: image + caption pairs through the ``maskjax_image_text_folder`` TFDS builder
(``data.manual_dir``: files ``NAME.jpg`` + ``NAME.txt``), or any TFDS image-text dataset prepared as
array_record (set ``data.name``, ``data.image_key``, ``data.text_key``, ``data.tokenizer``; ``maskjax data
convert`` for TFRecord-format ones; data_dir and tokenizer may be gs:// paths).

From the paper and the official code (facebookresearch/flip ``configs/default.py``, ``models_flip.py``
``compute_contrastive_loss``, ``t5x/train_state_initializer.py`` with ``utils/opt_util.py``): mask 0.5,
batch 32,768, lr 4e-6 x batch / 256, AdamW (0.9, 0.95), weight decay 0.2 on every parameter except
biases, LayerNorm scales and position tables (so on both projections, the text token table, the cls
token and the logit scale too; tests/test_equivalence.py checks six steps against that rule written
from the filters), text length 32, a *learnable* temperature
starting at 0.07 (logit scale 1/0.07) with the log-scale clipped to [0, log 100]; the config's
``clr.tau = 0.01`` is only used when the temperature is fixed (``tau_learnable=False``), which is not the
default. 6.4B samples seen. FLIP's text tokenizer is BERT's uncased WordPiece (``tf_bert``, 30,523
tokens, length 32): pass BERT's ``vocab.txt`` as ``data.tokenizer`` to match it.
Ours, not the paper's: without ``data.tokenizer``, a WordPiece vocabulary trained on the captions;
crop scale (0.5, 1), the warm-up length, no zero-shot eval during training (LAION has no labels; run
``maskjax eval`` with a labelled ``data.name`` and ``data.tokenizer``). Not FLIP's code either: the image
embedding averages the patch tokens (``models_flip.py`` averages the cls token in as well, one token of
197), and the text tower masks caption padding out of attention (FLIP's text encoder attends to it; its
``txt_is_valid`` is passed but unused).
"""
from maskjax import objectives
from maskjax.config import variants

PAPER = "flip"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)

SAMPLES_SEEN = 6_400_000_000
TOWERS = {
    "vit_b16": (dict(patch_size=16, width=768, depth=12, heads=12), dict(width=512, depth=12, heads=8), 512),
    "vit_l16": (dict(patch_size=16, width=1024, depth=24, heads=16), dict(width=768, depth=12, heads=12), 768),
}


def get_config(arg: str = "vit_b16"):
    chosen = variants(arg or "vit_b16", tuple(TOWERS) + ("unmasked",))
    sizes = [v for v in chosen if v in TOWERS] or ["vit_b16"]
    if len(sizes) > 1:
        raise ValueError(f"choose one model size of {sorted(TOWERS)}")
    image, text, embed = TOWERS[sizes[0]]
    c = objectives.base_config("flip")
    c.batch_size = 32768
    c.total_steps = SAMPLES_SEEN // c.batch_size
    c.log_every = 100
    c.data.update(name="maskjax_image_text_folder", image_size=224, channels=3, train_split="train",
                  eval_split="train", text_key="caption", seq_len=32, crop_scale=(0.5, 1.0), flip=False,
                  mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                  num_threads=32, prefetch=4)
    c.model.update(mlp_ratio=4.0, cls_token=True, dtype="bfloat16", remat="dots", one_hot_gather=True, **image)
    c.text_model.update(mlp_ratio=4.0, positions="learned", **text)
    c.mask.update(kind="random", ratio=0.5)
    c.flip.update(embed_dim=embed, init_temperature=0.07, max_logit_scale=100.0, text_mask_ratio=0.0)
    # t5x/train_state_initializer.py::create_optimizer with utils/opt_util.py's filters: weight decay on
    # every parameter but biases, LayerNorm scales and position tables (the text token table, the cls
    # token and the logit scale are decayed); warm-up from 0, cosine to min_abs_lr = 0
    c.optim.update(base_lr=4e-6, base_batch=256, b1=0.9, b2=0.95, weight_decay=0.2, min_lr_ratio=0.0,
                   warmup_steps=1600, schedule="cosine", decay_roles=("kernel", "embedding", "token", "temperature"))
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.checkpoint.update(every=2000, keep=3)
    c.eval.update(probe=False, zero_shot=False, num_images=0, batch_size=4096)
    if "unmasked" in chosen:
        c.mask.ratio = 0.0
    return c
