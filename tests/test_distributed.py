"""Multi-process runs (real ``jax.distributed`` processes on this machine, gloo collectives), process
detection, hybrid meshes, and the ahead-of-time compile check."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maskjax import step as step_lib
from maskjax import aot, cli, config as config_lib, distributed, metrics, sharding, train
from tests.conftest import ROOT, load_config

LAUNCH = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py")]
MAE = os.path.join(ROOT, "configs", "mae_digits.py")
# The default MAE config, a few steps: checkpoint at 3, warm-up inside the run.
FEW_STEPS = ["--config.total_steps=6", "--config.log_every=1", "--config.checkpoint.every=3",
             "--config.optim.warmup_steps=2"]


def launch(tmp_path, name, args, processes=2, devices=4, timeout=420, faults="", **popen):
    """Runs ``maskjax ARGS`` as ``processes`` x ``devices`` through launch/local_multiprocess.py."""
    logs = tmp_path / f"logs_{name}"
    command = LAUNCH + [f"--processes={processes}", f"--devices={devices}", f"--log_dir={logs}", "--grace=120",
                        "--", sys.executable, "-m", "maskjax"] + args
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["MASKJAX_FAULTS"] = faults
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if popen:
        return subprocess.Popen(command, env=env, cwd=ROOT, **popen), logs
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done, logs


def losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_match_one_process_and_resume_after_preemption(data_dir, tmp_path):
    reference = load_config("mae_digits.py", *(a.removeprefix("--config.") for a in FEW_STEPS), data_dir=data_dir)
    train.train(reference, str(tmp_path / "one"), evaluate=False, quiet=True)

    workdir = str(tmp_path / "two")
    common = ["train", "--config", MAE, "--workdir", workdir, f"--config.data.data_dir={data_dir}", "--no_eval",
              *FEW_STEPS]
    # Process 1 alone gets SIGTERM after step 1: JAX's preemption sync makes both save the same step and exit 75.
    first, logs = launch(tmp_path, "first", common, faults="term@step:1:p1")
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    assert "2 processes x 4 CPU devices" in first.stderr
    assert "[1] step" not in first.stdout  # only process 0 shows progress and writes logs
    saved = re.findall(r"preempted \(preemption notice\) at step (\d)", first.stdout)
    assert len(saved) == 2 and saved[0] == saved[1] and 1 <= int(saved[0]) < 6, first.stdout[-3000:]
    assert "process 0 exited with status 75" in first.stderr and "process 1 exited with status 75" in first.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [saved[0]]
    # The resumed leg runs on a hybrid mesh: the data axis crosses the two processes ("nodes").
    second, _ = launch(tmp_path, "second", common + ["--config.mesh_dcn.data=2"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from step {saved[0]}" in second.stdout

    one, two = losses(tmp_path / "one"), losses(workdir)
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6]  # each step once: process 1 writes nothing
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=0, atol=1e-5)
    runs = metrics.read_jsonl(os.path.join(workdir, "runs.jsonl"))
    assert [r["start_step"] for r in runs] == [0, int(saved[0])]


def test_killed_process_stops_the_other_with_a_clear_error(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    with open(tmp_path / "launcher.out", "w") as out, open(tmp_path / "launcher.err", "w") as err:
        proc, logs = launch(tmp_path, "kill", [
            "train", "--config", MAE, "--workdir", workdir, f"--config.data.data_dir={data_dir}", "--no_eval",
            "--config.total_steps=500", "--config.log_every=1", "--heartbeat_timeout=10"], stdout=out, stderr=err)
        log0 = logs / "process_0.log"
        try:
            deadline = time.monotonic() + 300
            while not (log0.exists() and "step 2/500" in log0.read_text(errors="replace")):
                assert proc.poll() is None, (tmp_path / "launcher.err").read_text()
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.5)
            # The launcher names the children's pids on its first line.
            pid = int(re.search(r"pids \[\d+, (\d+)\]", (tmp_path / "launcher.err").read_text()).group(1))
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=300)  # a hang guard: process 0 must stop by itself, not be killed by us
        finally:
            if proc.poll() is None:
                proc.kill()
    report = (tmp_path / "launcher.err").read_text()
    assert "process 1 killed by SIGKILL" in report
    text = log0.read_text(errors="replace")
    # Either the failed collective (exit 3, one line) or JAX's heartbeat watchdog stops process 0.
    assert ("maskjax: error: process 0 of 2: step" in text and "another process stopped" in text) \
        or "another task died" in text, text[-3000:]
    assert re.search(r"process 0 (exited with status 3|killed by SIGABRT)", report), report


def test_processes_with_different_configs_refuse_to_start(data_dir, tmp_path):
    path = tmp_path / "per_process.py"
    path.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'configs')!r})\n"
        "import mae_digits\n"
        "def get_config():\n"
        "    c = mae_digits.get_config('tiny')\n"
        "    c.model.depth = 2 + int(os.environ['JAX_PROCESS_ID'])\n"
        "    return c\n")
    done, logs = launch(tmp_path, "mismatch", [
        "train", "--config", str(path), "--workdir", str(tmp_path / "run"), f"--config.data.data_dir={data_dir}"],
        timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    one = (logs / "process_1.log").read_text()
    assert "processes [1] run a different config from process 0 (config.model.depth: 3 here vs 2" in one
    assert "processes [1] run a different config" in (logs / "process_0.log").read_text()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# --------------------------------------------------------------------------- detection (no processes)


def test_process_options_from_flags_environment_and_schedulers():
    assert distributed.options(environ={}) is None
    explicit = distributed.options("host:1234", 4, 2, environ={})
    assert (explicit.cluster, explicit.coordinator, explicit.num_processes, explicit.process_id) == \
        ("explicit", "host:1234", 4, 2)
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.options(environ=env).process_id == 1
    assert distributed.options(process_id=0, environ=env).process_id == 0  # flags win
    assert distributed.options(mode="off", environ=env) is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "3"}
    assert distributed.options(environ=slurm).cluster == "slurm"
    assert distributed.options(environ=dict(slurm, SLURM_NTASKS="1")) is None  # one task: nothing to join
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "gke_tpu"
    for kwargs, message in [
        (dict(coordinator="h:1"), "--num_processes is needed with --coordinator"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), "--process_id 2 must be in [0, 2)"),
        (dict(mode="on"), "no TPU pod, SLURM or Open MPI job was detected"),
        (dict(heartbeat_timeout=0), "--heartbeat_timeout 0 must be >= 1"),
    ]:
        with pytest.raises(distributed.DistributedError, match=re.escape(message)):
            distributed.options(environ={}, **kwargs)
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.options(environ={"JAX_NUM_PROCESSES": "two"})


def test_first_difference_names_the_key():
    mine = {"model": {"depth": 3, "width": 8}, "seed": 0}
    assert distributed.first_difference(mine, {"model": {"depth": 2, "width": 8}, "seed": 0}) == \
        "config.model.depth: 3 here vs 2 on process 0"


def test_process_rows_and_hybrid_mesh_errors(data_dir):
    config = load_config("mae_digits.py:tiny", data_dir=data_dir)
    setup = step_lib.build(config)
    np.testing.assert_array_equal(setup.rows(32), np.arange(32))
    assert len(sharding.process_rows(setup.mesh, 32, process_index=1)) == 0
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh_dcn: .*spans 2 slices/nodes, but the devices form 1 \(slices, else processes\)"):
        step_lib.build(config_lib.override(load_config("mae_digits.py:tiny", data_dir=data_dir), ["mesh_dcn.data=2"]))
    with pytest.raises(config_lib.ConfigError, match=r"mesh_dcn.fsdp=3 must be a positive divisor of mesh.fsdp=1"):
        step_lib.build(config_lib.override(load_config("mae_digits.py:tiny", data_dir=data_dir), ["mesh_dcn.fsdp=3"]))


# --------------------------------------------------------------------------- compile-check


def test_compile_check_vit_l_mae_batch_4096(tmp_path, capsys):
    """ViT-L/16 MAE at batch 4096 (the paper's setting) on 8 devices: memory and FLOPs are reported, and
    512 images per device do not fit a 16 GiB device (exit 4, with the numbers)."""
    out = tmp_path / "report.json"
    code = cli.main(["compile-check", "--config", os.path.join(ROOT, "configs", "mae_imagenet.py:vit_l16"),
                     "--mesh", "data=8", "--device_memory", "16GiB", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == aot.EXIT_DOES_NOT_FIT, text
    report = json.loads(out.read_text())
    assert report["batch_size"] == 4096 and report["devices"] == 8 and report["fits"] is False
    assert 300e6 < report["parameters"] < 350e6
    mem = report["memory_per_device"]
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    # Replicated state: parameters + two Adam moments in float32, on every device.
    assert mem["argument"] >= 3 * 4 * report["parameters"]
    assert report["flops_per_device"] > 0 and report["model_flops_per_step"] > 1e14
    needed = re.search(r"DOES NOT FIT: needs ([0-9.]+) GiB of 16.00 GiB per device", text)
    assert needed and float(needed.group(1)) > 16 and "memory per device: arguments" in text, text


def test_compile_check_fsdp_divides_state_memory(tmp_path):
    path = os.path.join(ROOT, "configs", "mae_digits.py")
    reports = {}
    for mesh in ("data=8", "data=2,fsdp=4"):
        out = tmp_path / f"{mesh}.json"
        assert cli.main(["compile-check", "--config", path, "--mesh", mesh, "--json", str(out)]) == 0
        reports[mesh] = json.loads(out.read_text())
        assert reports[mesh]["fits"] is True
    assert reports["data=2,fsdp=4"]["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    ratio = reports["data=8"]["memory_per_device"]["argument"] / reports["data=2,fsdp=4"]["memory_per_device"]["argument"]
    assert ratio > 2.5  # parameters and optimizer state are split four ways (small leaves stay replicated)


def test_compile_check_bad_input(capsys):
    path = os.path.join(ROOT, "configs", "mae_digits.py")
    for args, message in [
        (["--mesh", "rows=8"], "--mesh 'rows=8': expected AXIS=SIZE"),
        (["--mesh", "data=3"], "config.mesh: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, have 8"),
        (["--device_memory", "lots"], "--device_memory: cannot read 'lots' as a size"),
    ]:
        assert cli.main(["compile-check", "--config", path] + args) == 2
        assert message in capsys.readouterr().err


def test_parse_bytes():
    assert aot.parse_bytes("16GiB") == 16 * 2 ** 30
    assert aot.parse_bytes("80G") == 80 * 2 ** 30
    assert aot.parse_bytes("512MiB") == 512 * 2 ** 20
    assert aot.parse_bytes("1000") == 1000


def _params(workdir, config, step):
    from maskjax import checkpoint

    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    state = ckpt.restore_state(step, setup.abstract_state)
    ckpt.close()
    return jax.tree.map(np.asarray, jax.device_get(state["params"]))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """(config, workdir) of the uninterrupted 1 x 8 run every elastic resume must reproduce."""
    config = load_config("mae_digits.py", *(a.removeprefix("--config.") for a in FEW_STEPS), data_dir=data_dir)
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train(config, str(workdir), evaluate=False, quiet=True)
    assert [s for s, _ in losses(workdir)] == [1, 2, 3, 4, 5, 6]
    return config, workdir


def _same_as(uninterrupted, workdir):
    """Losses to 1e-5 and final parameters to 1e-5 of each tensor's scale: the global batch is the same,
    so the data, the masks (drawn per example from the global row) and the updates are."""
    config, reference = uninterrupted
    got, want = losses(workdir), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(_params(workdir, config, 6)), jax.tree.leaves(_params(reference, config, 6))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1.0))


def test_elastic_resume_from_two_processes_on_one(data_dir, tmp_path, uninterrupted):
    """Checkpointed by 2 processes x 4 devices; resumed by 1 x 8 and by 1 x 4."""
    import shutil

    config, _ = uninterrupted
    two = str(tmp_path / "two")
    first, _ = launch(tmp_path, "two_first", ["train", "--config", MAE, "--workdir", two, "--stop_at=3",
                                              f"--config.data.data_dir={data_dir}", "--no_eval", *FEW_STEPS])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name, devices in (("to_eight", jax.devices()), ("to_four", jax.devices()[:4])):
        workdir = tmp_path / name
        shutil.copytree(two, workdir)
        summary = train.train(config, str(workdir), devices=devices, evaluate=False, quiet=True)
        assert summary["start_step"] == 3
        _same_as(uninterrupted, workdir)


@pytest.mark.parametrize("first_mesh, devices, resumed_mesh", [
    ((), 8, ()),  # 1 x 8 -> 2 x 4, same mesh shape (data=8)
    (("mesh.data=1", "mesh.fsdp=4"), 4, ("--config.mesh.data=8",)),  # 1 x 4 on fsdp=4 -> 2 x 4 on data=8
])
def test_elastic_resume_from_one_process_on_two(data_dir, tmp_path, uninterrupted, first_mesh, devices,
                                                resumed_mesh):
    """Checkpointed by one process (8 devices, or 4 on an FSDP mesh, which Orbax reshards on load);
    resumed by 2 processes x 4 devices."""
    workdir = str(tmp_path / "one")
    config = load_config("mae_digits.py", *(a.removeprefix("--config.") for a in FEW_STEPS), *first_mesh,
                         data_dir=data_dir)
    train.train(config, workdir, devices=jax.devices()[:devices], stop_at=3, evaluate=False, quiet=True)
    second, _ = launch(tmp_path, "two_second", ["train", "--config", MAE, "--workdir", workdir, *resumed_mesh,
                                                f"--config.data.data_dir={data_dir}", "--no_eval", *FEW_STEPS])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from step 3" in second.stdout
    _same_as(uninterrupted, workdir)
