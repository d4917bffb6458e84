"""Masked diffusion against autoregression at equal compute ("Scaling up Masked Diffusion Models on
Text" asks this at scale): four model sizes each of MDLM and the AR baseline on the embedded corpus,
identical data, packing, optimizer and step budget; the report fits loss against training FLOPs per
objective and states the compute multiplier between them at equal loss.

maskjax sweep --sweep configs/sweeps/mdlm_vs_ar.py --workdir runs/sweeps/mdlm_vs_ar
maskjax sweep --report runs/sweeps/mdlm_vs_ar

The two losses are both nats per token but not over the same tokens: MDLM's is its ELBO bound over
every token, AR's the exact next-token loss over every token that has a predecessor in its segment.
"""
from maskjax.sweep import grid, product, zipped

CONFIG = "configs/mdlm_text.py"


def get_sweep():
    objectives = grid({"objective": ["mdlm", "ar"]})
    sizes = zipped({"model.width": [32, 64, 96, 128], "model.depth": [1, 2, 3, 4], "model.heads": [1, 2, 3, 4]})
    return product(objectives, sizes, [{"total_steps": 600, "checkpoint.every": 600, "log_every": 25,
                                        "optim.warmup_steps": 50, "eval.max_batches": 20}])
