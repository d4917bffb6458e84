"""dBOT's multi-stage bootstrap on the embedded digits ("Exploring Target Representations for Masked
Autoencoders", Liu et al. 2022), beside MAE with pixel targets, in one command:

maskjax sweep --sweep configs/sweeps/dbot_digits.py --workdir runs/dbot_digits
maskjax sweep --report runs/dbot_digits

Point 0 is MAE (norm-pix targets). Point 1 is dBOT's first stage: the decoder regresses the
layer-normalised features of a frozen, randomly initialised encoder of the same architecture. Point 2
is the second stage: its frozen teacher is point 1's final student (``"{point:1}"`` is point 1's
workdir; points run in order). Every stage trains as long as MAE (dBOT also trains each stage for the
same number of epochs). The report lists each point's linear probe and k-NN accuracy beside its
random-init and raw-pixel baselines (eval.json).
"""
CONFIG = "configs/mae_digits.py"


def get_sweep():
    return [
        {"loss.target": "pixels", "teacher.workdir": ""},
        {"loss.target": "teacher", "teacher.workdir": ""},
        {"loss.target": "teacher", "teacher.workdir": "{point:1}"},
    ]
