"""ELECTRA-Small pretraining recipe (Clark et al. 2020; google-research/electra): a 12 x 256
post-norm discriminator with 4 heads and 128-wide embeddings projected up, a generator of a quarter
of its width (64, one head, same depth) sharing those embeddings, 15% masking (85% [MASK], 15% kept),
generator samples at temperature 1, loss = MLM + 50 x replaced-token detection; batch 128 at
sequence length 128 (19 predictions per row), Adam lr 5e-4 with 10k warm-up and linear decay to 0
over 1M steps, weight decay 0.01 on every weight matrix and embedding table, global-norm clip 1.

Values from the official ``configure_pretraining.py`` (model_size='small'), ``run_pretraining.py``
(get_generator_config, the two heads and losses), ``pretrain/pretrain_helpers.py`` (masking,
Gumbel sampling) and ``model/optimization.py`` (AdamWeightDecayOptimizer: epsilon 1e-6, no bias
correction, no decay on LayerNorm and biases).

Needs a tokenizer file (ELECTRA uses BERT's uncased ``vocab.txt``, 30,522 ids) and a prepared TFDS
text dataset (default English Wikipedia; the paper adds BookCorpus, which is not in TFDS):

  maskjax train --config configs/electra_small.py --workdir runs/electra_small \\
      --config.data.tokenizer=/path/to/vocab.txt

The learning rate is the official one, linear decay from step 0 times the warm-up ramp min(1, step /
10k) (``optim.decay_start='zero_scaled'``; BERT's warm-up replaces the decay's start instead).
Deviations that remain: masked positions are drawn without replacement and the budget counts maskable tokens (see
``maskjax/objectives/electra.py``); no token-type embeddings (single segments).
"""
from maskjax import objectives

PAPER = "electra_small"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"unknown variant {arg!r}; this recipe has none")
    c = objectives.base_config("electra")
    c.batch_size = 128
    c.total_steps = 1_000_000
    c.log_every = 100
    c.data.update(name="wikipedia/20230601.en", train_split="train[:99%]", eval_split="train[99%:]", text_key="text",
                  seq_len=128, prefetch=8)
    c.model.update(width=256, depth=12, heads=4, mlp_ratio=4.0, max_len=512, positions="learned",
                   pre_norm=False, qkv_bias=True, norm_eps=1e-12, dtype="bfloat16", remat="none")
    c.mask.update(kind="token", ratio=0.15, schedule="constant")
    c.mlm.update(max_predictions=19, sparse=True)  # int((0.15 + 0.005) * 128)
    c.electra.update(generator_ratio=0.25, embed_dim=128, disc_weight=50.0, temperature=1.0, mask_share=0.85)
    c.optim.update(base_lr=5e-4, base_batch=128, b1=0.9, b2=0.999, eps=1e-6, bias_correction=False,
                   weight_decay=0.01, decay_roles=("kernel", "embedding", "position"), warmup_steps=10_000,
                   schedule="linear", decay_start="zero_scaled", min_lr_ratio=0.0, clip_norm=1.0)
    c.checkpoint.update(every=10_000, keep=3)
    c.eval.update(batch_size=128, max_batches=100)
    return c
