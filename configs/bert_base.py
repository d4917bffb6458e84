"""BERT-base pretraining recipe (Devlin et al. 2018; google-research/bert): 12 layers x 768, post-norm,
learned positions, 15% masking with 80/10/10, batch 256, Adam lr 1e-4 with 10k warm-up and linear
decay over 1M steps, weight decay 0.01 on every weight matrix and embedding table (not LayerNorm or biases); 90% of the steps at sequence length 128 with 20 predictions
per sequence, the last 10% at 512 with 80.

Needs a tokenizer file (BERT's uncased ``vocab.txt``, or any WordPiece/SentencePiece file with a
mask token) and a prepared TFDS text dataset (default English Wikipedia; BookCorpus is not in TFDS):

  maskjax train --config configs/bert_base.py:128 --workdir runs/bert_base --stop_at 900000 \\
      --config.data.tokenizer=/path/to/vocab.txt
  maskjax train --config configs/bert_base.py:512 --workdir runs/bert_base \\
      --config.data.tokenizer=/path/to/vocab.txt

The second command resumes the first run's checkpoint: parameter shapes (512 positions) and the
learning-rate schedule (1M steps) are the same in both phases; only the packing length changes.

Optimizer as in ``optimization.py`` (``AdamWeightDecayOptimizer``): epsilon 1e-6, no bias correction of
the moments (``optim.bias_correction=False``), decay on everything but LayerNorm and biases (word and
position tables included), linear decay of the global step from 0 with the warm-up replacing its start
(``optim.decay_start='zero'``); checked step by step against a NumPy transcription of that optimizer
(tests/test_equivalence.py). Deviations that remain: no next-sentence prediction (RoBERTa showed it does
not help); the masking budget counts maskable tokens, where BERT counts [CLS] and [SEP] too (one
position more or less in some rows).
"""
from maskjax import objectives

PAPER = "bert"  # the paper this recipe follows (an objective's papers; docs/reference/recipes)


def get_config(arg: str = "128"):
    if arg not in ("128", "512"):
        raise ValueError(f"unknown variant {arg!r}; known: 128 (phase 1), 512 (phase 2)")
    c = objectives.base_config("mlm")
    c.batch_size = 256
    c.total_steps = 1_000_000
    c.log_every = 100
    c.data.update(name="wikipedia/20230601.en", train_split="train[:99%]", eval_split="train[99%:]", text_key="text",
                  seq_len=int(arg), prefetch=8)
    c.model.update(width=768, depth=12, heads=12, mlp_ratio=4.0, max_len=512, positions="learned",
                   pre_norm=False, qkv_bias=True, norm_eps=1e-12, dtype="bfloat16", remat="none")
    c.mask.update(kind="token", ratio=0.15, schedule="constant")
    c.mlm.update(replace=True, max_predictions=20 if arg == "128" else 80, sparse=True)
    # google-research/bert optimization.py: epsilon 1e-6, no bias correction; decay on everything but LayerNorm
    # and biases (word and position tables too); linear decay of the global step from 0, warm-up replacing its start
    c.optim.update(base_lr=1e-4, base_batch=256, b1=0.9, b2=0.999, eps=1e-6, bias_correction=False,
                   weight_decay=0.01, decay_roles=("kernel", "embedding", "position"), warmup_steps=10_000,
                   schedule="linear", decay_start="zero", min_lr_ratio=0.0, clip_norm=1.0)
    c.checkpoint.update(every=10_000, keep=3)
    c.eval.update(batch_size=256, max_batches=100)
    return c
