"""MAE model size x training length on the embedded digits: the compute power-law fit (study a).

maskjax sweep --sweep configs/sweeps/mae_size_length.py --workdir runs/sweeps/mae_size_length
maskjax sweep --report runs/sweeps/mae_size_length

Three encoder sizes (width x depth) times three training lengths, everything else as
configs/mae_digits.py (mask 0.75, normalised-pixel targets, AdamW, cosine schedule over each run's length).
"""
from maskjax.sweep import grid, product, zipped

CONFIG = "configs/mae_digits.py"


def get_sweep():
    sizes = zipped({"model.width": [64, 96, 128], "model.depth": [2, 3, 4], "model.heads": [2, 3, 4]})
    lengths = grid({"total_steps": [250, 500, 1000]})
    # checkpoints at the end only, a warm-up that fits the shortest run
    return product(sizes, lengths, [{"checkpoint.every": 1000, "optim.warmup_steps": 50, "log_every": 25}])
