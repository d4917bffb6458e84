"""data2vec 2.0 on the embedded digits at MAE's training wall-clock and at the recipe's length:

maskjax sweep --sweep configs/sweeps/data2vec_digits.py --workdir runs/data2vec_digits

A data2vec digits step (4 masks of 13 visible tokens per image, the teacher on all 65, a convolutional
decoder) costs 712 ms against MAE's 79 ms on 2 Intel Xeon cores (``maskjax bench ... --data
synthetic --steps 10``), so MAE's 2,000 steps buy 220 data2vec steps; point 1 is the recipe's 500.
The EMA decay is annealed over each point's own length. Compared with MAE and dBOT by
``launch/teacher_study.py``.
"""
CONFIG = "configs/data2vec_digits.py"


def get_sweep():
    return [
        {"total_steps": 220, "data2vec.ema_anneal_steps": 220},
        {"total_steps": 500, "data2vec.ema_anneal_steps": 500},
    ]
