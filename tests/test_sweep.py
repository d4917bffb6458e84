"""Sweeps: the power-law fitter, sweep files, --emit, a resumable run with a failed point, and the report."""
import json
import os
import shlex

import numpy as np
import pytest

from maskjax import cli, sweep
from tests.conftest import ROOT


@pytest.mark.parametrize("a,b,c", [(5.0, 0.3, 1.2), (40.0, 0.55, 0.2), (2.0, 0.12, 0.0)])
def test_fitter_recovers_known_exponents(a, b, c):
    rng = np.random.default_rng(0)
    x = np.geomspace(1e12, 1e16, 12)
    y = sweep.saturating_power_law(x, a * 1e12 ** b, b, c) * (1 + 0.002 * rng.standard_normal(len(x)))
    fit = sweep.fit_power_law(x, y)
    assert fit["b"] == pytest.approx(b, rel=0.05)
    assert fit["c"] == pytest.approx(c, abs=0.03 * (a + c))
    assert fit["b_ci95"][0] <= b <= fit["b_ci95"][1] and fit["r2"] > 0.999 and fit["points"] == 12


def test_fitter_needs_four_points():
    with pytest.raises(sweep.SweepError, match="at least 4"):
        sweep.fit_power_law([1.0, 2.0, 3.0], [1.0, 0.5, 0.4])


def test_grid_zip_product_and_names():
    points = sweep.product(sweep.zipped({"model.width": [32, 64], "model.depth": [2, 4]}),
                           sweep.grid({"total_steps": [10, 20]}))
    assert points == [{"model.width": 32, "model.depth": 2, "total_steps": 10},
                      {"model.width": 32, "model.depth": 2, "total_steps": 20},
                      {"model.width": 64, "model.depth": 4, "total_steps": 10},
                      {"model.width": 64, "model.depth": 4, "total_steps": 20}]
    assert sweep.point_name(3, {"model.width": 64, "data.crop_scale": (0.2, 1.0)}) == \
        "003-model.width=64,data.crop_scale=0.2,1.0"
    with pytest.raises(sweep.SweepError, match="differ in length"):
        sweep.zipped({"a": [1, 2], "b": [1]})


@pytest.mark.parametrize("name", ["mae_size_length.py", "mae_mask_ratio.py", "mlm_mask_rate.py", "mdlm_vs_ar.py",
                                  "electra_vs_mlm.py", "dbot_digits.py"])
def test_shipped_sweeps_load_and_validate(name):
    base, points = sweep.load(os.path.join(ROOT, "configs", "sweeps", name))
    assert base.startswith("configs/") and len(points) >= 2


@pytest.mark.parametrize("launcher", sweep.LAUNCHERS)
def test_emit_prints_one_valid_command_per_point(tmp_path, capsys, launcher):
    status = cli.main(["sweep", "--sweep", "configs/sweeps/mae_mask_ratio.py", "--workdir", str(tmp_path / "s"),
                       "--emit", launcher, "--config.batch_size=64"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and len(lines) == 6
    for line, ratio in zip(lines, [0.25, 0.5, 0.6, 0.75, 0.85, 0.9]):
        words = shlex.split(line)
        args = words[words.index("train"):]
        parsed = cli._parser().parse_args([a for a in args if not a.startswith("--config.")])  # valid maskjax flags
        assert parsed.command == "train" and parsed.workdir.startswith(str(tmp_path / "s" / "points"))
        assert f"--config.mask.ratio={ratio}" in args and args.index("--config.batch_size=64") < args.index(
            f"--config.mask.ratio={ratio}")
        if launcher == "slurm":
            assert words[:1] == ["sbatch"] and "launch/slurm_gpu.sbatch" in words
        if launcher == "tpu":
            assert words[0] == "launch/tpu_pod.sh" and '"$ZONE"' in line
    index = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["status"] for p in index["points"]] == ["pending"] * 6


def test_bad_sweep_point_names_it(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text("CONFIG = 'configs/mae_digits.py'\ndef get_sweep():\n    return [{'model.depth': 2}, "
                    "{'model.depthh': 3}]\n")
    assert cli.main(["sweep", "--sweep", str(path), "--workdir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "point 1 {'model.depthh': 3}: config.model.depthh: unknown key" in err


def test_chained_points_train_in_order_with_the_previous_student_as_teacher(data_dir, tmp_path, capsys):
    """dBOT's bootstrap as a sweep: point 1's frozen teacher is point 0's final encoder ("{point:0}"); a
    reference to a later point is refused with the point named."""
    import jax

    from maskjax import checkpoint, config as config_lib, step as step_lib

    path = tmp_path / "chain.py"
    path.write_text("CONFIG = 'configs/mae_digits.py:tiny'\ndef get_sweep():\n    return [{'loss.target': 'teacher'},"
                    " {'loss.target': 'teacher', 'teacher.workdir': '{point:0}'}]\n")
    workdir = str(tmp_path / "s")
    extra = [f"--config.data.data_dir={data_dir}", "--config.total_steps=2", "--config.eval.probe=False"]
    assert cli.main(["sweep", "--sweep", str(path), "--workdir", workdir, "--emit", "local", *extra]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert f"--config.teacher.workdir={workdir}/points/000" in second
    index = sweep.run(str(path), workdir, extra=extra)
    assert [p["status"] for p in index["points"]] == ["done", "done"], index
    student, _ = step_lib.saved_params(index["points"][0]["workdir"], 0, ("encoder",))
    config = config_lib.override(config_lib.load("configs/mae_digits.py:tiny"),
                                 ["loss.target=teacher", f"teacher.workdir={index['points'][0]['workdir']}"])
    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(index["points"][1]["workdir"], read_only=True)
    teacher = ckpt.restore_state(2, setup.abstract_state)["teacher"]
    ckpt.close()
    for a, b in zip(jax.tree.leaves(jax.device_get(teacher)), jax.tree.leaves(student)):
        np.testing.assert_array_equal(a, b)
    path.write_text("CONFIG = 'configs/mae_digits.py:tiny'\ndef get_sweep():\n    return [{'teacher.workdir': "
                    "'{point:1}'}, {'loss.target': 'teacher'}]\n")
    with pytest.raises(sweep.SweepError, match="point 0: teacher.workdir=.point:1. must name an earlier point"):
        sweep.load(str(path))


def test_run_resumes_records_failures_and_reports(data_dir, tmp_path):
    path = tmp_path / "tiny.py"
    # Point 1 passes validation but cannot run: its dataset is not prepared.
    path.write_text(
        "CONFIG = 'configs/mae_digits.py:tiny'\n"
        "def get_sweep():\n"
        "    return [{'model.depth': 1}, {'data.name': 'not_prepared_here'}]\n")
    workdir = tmp_path / "s"
    args = ["sweep", "--sweep", str(path), "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.eval.max_batches=1"]
    assert cli.main(args) == 1  # one point failed
    index = json.loads((workdir / "sweep.json").read_text())
    assert [p["status"] for p in index["points"]] == ["done", "failed"]
    assert index["data_dir"] == data_dir  # the report looks there when a point's config leaves it to the env
    first = os.path.getmtime(workdir / "points" / index["points"][0]["name"] / "eval.json")
    assert cli.main(args) == 1  # finished points are not redone; the failed one is tried again
    assert os.path.getmtime(workdir / "points" / index["points"][0]["name"] / "eval.json") == first

    out = sweep.report(str(workdir))
    assert out["failed"] == [index["points"][1]["name"]]
    failed = next(p for p in out["points"] if p["status"] == "failed")
    assert "not_prepared_here" in failed["error"]
    done = [p for p in out["points"] if p["status"] == "done"]
    assert len(done) == 1 and done[0]["final_loss"] > 0 and done[0]["metric"] == "linear_probe"
    assert done[0]["loss"] == done[0]["final_loss"] and done[0]["loss_source"] == "training"  # MAE: no held-out loss
    for key in ("raw_pixels_linear_probe", "raw_pixels_knn", "random_init_linear_probe", "random_init_knn"):
        assert 0.0 < done[0][key] <= 1.0, key  # the baselines travel with every claim
    assert "raw_pixels_knn" in (workdir / "report.csv").read_text()
    assert done[0]["parameters"] < failed["parameters"] and done[0]["train_flops"] < failed["train_flops"]  # depth 1 < 2
    assert done[0]["examples_seen"] == 8 * 32 and done[0]["non_embedding_parameters"] < done[0]["parameters"]
    for name in ("report.json", "report.csv", "loss_vs_compute.png", "loss_curves.png"):
        assert (workdir / name).stat().st_size > 0
    assert "failed" in (workdir / "report.csv").read_text()


def test_no_loss_fit_across_mask_ratios():
    """MAE's loss is over the hidden patches: across mask ratios it measures different things, so the
    report fits nothing and says why; at one ratio the same points are fitted."""
    rows = [{"name": f"{i:03d}", "objective": "mae", "mask_ratio": ratio, "train_flops": 1e12 * (i + 1),
             "non_embedding_parameters": 1000, "examples_seen": 1000, "loss": 1.0 / (i + 1) ** 0.3 + 0.1}
            for i, ratio in enumerate([0.25, 0.5, 0.75, 0.9])]
    fits, frontier = sweep.loss_fits(rows)
    assert frontier == [] and "mask_ratio varies" in fits["compute"]["error"]
    fits, frontier = sweep.loss_fits([dict(r, mask_ratio=0.75) for r in rows])
    assert len(frontier) == 4 and abs(fits["compute"]["b"] - 0.3) < 0.05


def test_objectives_are_fitted_apart_and_compared_at_equal_loss(tmp_path):
    """Two objectives whose losses follow the same law, the second needing 8x the compute: each is
    fitted on its own points, and the multiplier at each point's loss is 8 one way and 1/8 the other."""
    rows = []
    for name, factor in (("mdlm", 8.0), ("ar", 1.0)):
        for i, flops in enumerate([1e12, 4e12, 1.6e13, 6.4e13, 2.56e14]):
            rows.append({"name": f"{name}{i}", "objective": name, "mask_ratio": None, "train_flops": flops,
                         "non_embedding_parameters": 1000 * (i + 1), "examples_seen": 1000,
                         "loss": 2.0 * (flops / factor / 1e12) ** -0.3 + 1.0})
    fits = {name: sweep.loss_fits([r for r in rows if r["objective"] == name])[0]["compute"] for name in ("mdlm", "ar")}
    assert all(abs(f["b"] - 0.3) < 1e-3 and abs(f["c"] - 1.0) < 1e-3 for f in fits.values())
    multipliers = sweep.compute_multipliers(rows, fits)
    at_ar = [m["multiplier"] for m in multipliers if m["reference"] == "ar"]
    at_mdlm = [m["multiplier"] for m in multipliers if m["reference"] == "mdlm"]
    assert len(at_ar) == len(at_mdlm) == 5
    np.testing.assert_allclose(at_ar, 8.0, rtol=1e-3)
    np.testing.assert_allclose(at_mdlm, 1 / 8.0, rtol=1e-3)
    assert sweep.compute_for_loss(fits["ar"], 0.99) == float("inf")  # below the fitted floor


def test_report_plots_the_downstream_text_task_beside_its_baselines(tmp_path):
    rows = [{"name": f"00{i}-objective={name}", "objective": name, "status": "done", "mask_ratio": 0.15,
             "train_flops": 1e13, "loss": 5.0, "loss_source": "validation", "final_loss": 5.0,
             "text_pretrained_linear_probe": 0.7 - 0.1 * i, "text_pretrained_knn": 0.6, "text_pretrained_finetune": 0.9,
             "text_random_init_linear_probe": 0.5, "text_random_init_knn": 0.4, "text_random_init_finetune": 0.9,
             "text_bag_of_words_linear_probe": 0.94, "text_majority_class": 0.19}
            for i, name in enumerate(("mlm", "electra"))]
    written = sweep.plots(str(tmp_path), rows, {}, [], None)
    assert str(tmp_path / "downstream_text.png") in written and (tmp_path / "downstream_text.png").stat().st_size > 0
