"""MAE mask ratio 0.25 ... 0.9 on the embedded digits: linear probe, k-NN and 10-epoch fine-tuning accuracy
against the mask ratio (study b),
the small-scale counterpart of the MAE paper's mask-ratio figure.

maskjax sweep --sweep configs/sweeps/mae_mask_ratio.py --workdir runs/sweeps/mae_mask_ratio
maskjax sweep --report runs/sweeps/mae_mask_ratio
"""
from maskjax.sweep import grid

CONFIG = "configs/mae_digits.py"


def get_sweep():
    return grid({"mask.ratio": [0.25, 0.5, 0.6, 0.75, 0.85, 0.9], "total_steps": [1000],
                 "checkpoint.every": [1000], "log_every": [25], "eval.finetune_epochs": [10.0],
                 "eval.finetune_lr": [2e-3]})
