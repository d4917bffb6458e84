"""MLM masking rate on the embedded text corpus: 15% vs 40% vs a 30% -> 15% schedule (study c), masked
accuracy on the validation split (at each run's own training rate: compare losses with that in mind).

maskjax sweep --sweep configs/sweeps/mlm_mask_rate.py --workdir runs/sweeps/mlm_mask_rate
maskjax sweep --report runs/sweeps/mlm_mask_rate
"""
CONFIG = "configs/mlm_text.py"


def get_sweep():
    common = {"total_steps": 1500, "checkpoint.every": 1500, "log_every": 25}
    return [
        {"mask.ratio": 0.15, "mlm.max_predictions": 10, **common},
        {"mask.ratio": 0.4, "mlm.max_predictions": 26, **common},
        {"mask.ratio": 0.3, "mask.schedule": "linear", "mask.final_ratio": 0.15, "mlm.max_predictions": 20, **common},
    ]
