"""ELECTRA against MLM at equal training compute (the ELECTRA paper's claim, at toy scale): the same
discriminator-sized encoder, data, packing and optimizer as ``configs/mlm_text.py``; ELECTRA's step
costs its generator too (``flops()``: 12.5 vs 11.5 GFLOP per step at batch 32), so it gets
proportionally fewer steps. The comparison is the downstream task on frozen features
(``eval.json`` -> ``text_probe``: linear probe next to random init and bag of words).

maskjax sweep --sweep configs/sweeps/electra_vs_mlm.py --workdir runs/sweeps/electra_vs_mlm
maskjax sweep --report runs/sweeps/electra_vs_mlm
"""
CONFIG = "configs/mlm_text.py"


def get_sweep():
    common = {"checkpoint.every": 1500, "log_every": 50}
    return [{"objective": "mlm", "total_steps": 1500, **common},
            {"objective": "electra", "total_steps": 1380, "mlm.max_predictions": 10, **common}]
