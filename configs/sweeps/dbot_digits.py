"""MAE against dBOT's two-stage bootstrap on the embedded digits, at equal training wall-clock
("Exploring Target Representations for Masked Autoencoders", Liu et al. 2022), in one command:

maskjax sweep --sweep configs/sweeps/dbot_digits.py --workdir runs/dbot_digits
maskjax sweep --report runs/dbot_digits

Point 0 is MAE (norm-pix targets, the recipe's 2,000 steps). Point 1 is dBOT's first stage: the decoder
regresses the layer-normalised features of a frozen, randomly initialised encoder of the same
architecture. Point 2 is the second stage: its frozen teacher is point 1's final student
(``"{point:1}"`` is point 1's workdir; points run in order). The two stages share MAE's budget: a
dBOT step (student + frozen teacher) costs 103 ms against MAE's 79 ms
(``maskjax bench --config configs/mae_digits.py [--config.loss.target=teacher] --data synthetic
--steps 10``, 2 Intel Xeon cores), so each stage trains 770 steps (2 x 770 x 103 ms = 2,000 x 79 ms).
``launch/teacher_study.py`` runs this and ``configs/sweeps/data2vec_digits.py`` and plots both.
"""
CONFIG = "configs/mae_digits.py"


def get_sweep():
    return [
        {"loss.target": "pixels", "teacher.workdir": "", "total_steps": 2000},
        {"loss.target": "teacher", "teacher.workdir": "", "total_steps": 770},
        {"loss.target": "teacher", "teacher.workdir": "{point:1}", "total_steps": 770},
    ]
