#!/usr/bin/env bash
# The GPU performance targets of docs/performance.md in one command, on one GPU host (H100/H200/A100):
#
#   bash launch/gpu_bench.sh OUT_DIR
#
# 1. MAE ViT-L/16 at 224, bf16, mask 0.75 and mask 0 (the masking speed-up on this GPU);
# 2. BERT-large MLM at sequence 512, bf16 (BERT-base's recipe at width 1024, depth 24, 16 heads).
# Synthetic data (no dataset needed); each writes a JSON file and a jax.profiler trace under OUT_DIR.
# The bench header line must say "cudnn attention": model.attention=auto picks cuDNN's fused flash
# attention on a CUDA GPU in bf16. Per-GPU batches (MAE_BATCH, BERT_BATCH), timed and warm-up steps
# (STEPS, WARMUP) can be changed through the environment; extra arguments go to both bench commands
# (e.g. --config.model.remat=dots). Run from the repository root with maskjax installed (the cuda extra).
set -euo pipefail
out=${1:?usage: bash launch/gpu_bench.sh OUT_DIR [extra maskjax bench flags]}
shift
mkdir -p "$out"
MAE_BATCH=${MAE_BATCH:-256}
BERT_BATCH=${BERT_BATCH:-64}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
MASKJAX=${MASKJAX:-maskjax}

# A 30,522-entry WordPiece vocabulary (BERT's size); with synthetic data only its size matters.
vocab="$out/vocab30522.txt"
python3 -c "import sys; s=['[PAD]','[UNK]','[CLS]','[SEP]','[MASK]']; open(sys.argv[1],'w').write('\n'.join(s+[f'w{i}' for i in range(30522-5)])+'\n')" "$vocab"

$MASKJAX bench --config configs/mae_imagenet.py:vit_l16 --data synthetic --steps "$STEPS" --warmup "$WARMUP" \
    --config.batch_size="$MAE_BATCH" --sweep mask_ratio=0.75,0 \
    --json "$out/mae_vit_l16.json" --profile "$out/profile_mae_vit_l16" "$@" | tee "$out/mae_vit_l16.txt"

$MASKJAX bench --config configs/bert_base.py:512 --data synthetic --steps "$STEPS" --warmup "$WARMUP" \
    --config.model.width=1024 --config.model.depth=24 --config.model.heads=16 \
    --config.batch_size="$BERT_BATCH" --config.data.tokenizer="$vocab" \
    --json "$out/bert_large_512.json" --profile "$out/profile_bert_large_512" "$@" | tee "$out/bert_large_512.txt"
