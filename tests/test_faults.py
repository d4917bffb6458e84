"""Reliability: SIGKILL anywhere, SIGTERM preemption, non-finite steps, damaged and foreign checkpoints,
corrupt records. Runs are real ``maskjax train`` processes; faults are real signals (``MASKJAX_FAULTS``
picks the moment deterministically; ``MASKJAX_KILL_LOOP=N`` adds N kills at random times)."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maskjax import step as step_lib
from maskjax import checkpoint, faults, goodput, metrics, train
from tests.conftest import ROOT, load_config

STEPS = 8


def _env(cache, fault=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MASKJAX_FAULTS=fault,
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _args(data_dir, workdir, *extra):
    return [sys.executable, "-m", "maskjax", "train", "--config", "configs/mae_digits.py:tiny",
            "--workdir", str(workdir), "--config.log_every=1", "--config.checkpoint.every=2",
            "--config.checkpoint.keep=3", f"--config.data.data_dir={data_dir}", *extra]


def run(data_dir, cache, workdir, *extra, fault=""):
    return subprocess.run(_args(data_dir, workdir, *extra), capture_output=True, text=True, cwd=ROOT,
                          env=_env(cache, fault), timeout=600)


def history(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def restored_params(config, workdir, step):
    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    state = ckpt.restore_state(step, setup.abstract_state)
    ckpt.close()
    return jax.tree.map(np.asarray, jax.device_get(state))


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def reference(data_dir, cache, tmp_path_factory):
    """An uninterrupted run with its final evaluation."""
    workdir = tmp_path_factory.mktemp("reference")
    out = run(data_dir, cache, workdir)
    assert out.returncode == 0, out.stderr
    return workdir


def tiny_config(data_dir, *overrides):
    return load_config("mae_digits.py:tiny", "log_every=1", "checkpoint.every=2", "checkpoint.keep=3", *overrides,
                       data_dir=data_dir)


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(data_dir, cache, reference, tmp_path):
    workdir = tmp_path / "killed"
    kills = ["kill@compile:1", "kill@step:3", "kill@checkpoint:4", "kill@eval:1"]
    for fault in kills:
        out = run(data_dir, cache, workdir, fault=fault)
        assert out.returncode == -signal.SIGKILL, (fault, out.stderr[-2000:])
        if fault == "kill@checkpoint:4":  # killed while step 4 was being written: it is not a checkpoint
            assert not (workdir / "checkpoints" / "4").exists()
    assert not (workdir / "eval.json").exists()
    out = run(data_dir, cache, workdir)
    assert out.returncode == 0, out.stderr
    assert "resumed from step 8" in out.stderr  # only the evaluation was left
    assert history(workdir) == history(reference)
    config = tiny_config(data_dir)
    assert_same_tree(restored_params(config, workdir, STEPS), restored_params(config, reference, STEPS))
    got, want = (json.loads((w / "eval.json").read_text()) for w in (workdir, reference))
    assert got["step"] == want["step"] == STEPS and got["pretrained"] == want["pretrained"]
    runs = metrics.read_jsonl(str(workdir / "runs.jsonl"))
    starts = [r["start_step"] for r in runs]
    assert len(starts) == len(kills) + 1 and starts[0] == 0 and starts[-1] == STEPS  # every start that wrote here
    # goodput over the five runs: each killed run left its account; restarts cost start-ups and redone steps
    total = goodput.summarize(runs)
    assert total["runs"] == len(kills) + 1 and total["lost"] > 0 and 0 < total["goodput"] < 1
    assert all(r["seconds"]["wall"] > 0 for r in runs)
    assert runs[2]["seconds"]["last_step"] == 4 and runs[3]["start_step"] == 2  # kill@checkpoint:4 redid 3-4
    assert goodput.line(total).split(":")[0] in out.stderr
    record = metrics.read_jsonl(str(workdir / "metrics.jsonl"))[-1]
    assert 0 < record["goodput"] < 1 and {f"time/{p}" for p in goodput.PARTS} <= set(record)


@pytest.mark.skipif(not os.environ.get("MASKJAX_KILL_LOOP"), reason="set MASKJAX_KILL_LOOP=N for N random kills")
def test_sigkill_at_random_moments(data_dir, cache, reference, tmp_path):
    workdir = tmp_path / "random_kills"
    rng = random.Random(int(os.environ.get("MASKJAX_KILL_SEED", "0")))
    for _ in range(int(os.environ["MASKJAX_KILL_LOOP"])):
        proc = subprocess.Popen(_args(data_dir, workdir), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 20.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = run(data_dir, cache, workdir)
    assert out.returncode == 0, out.stderr
    assert history(workdir) == history(reference)
    config = tiny_config(data_dir)
    assert_same_tree(restored_params(config, workdir, STEPS), restored_params(config, reference, STEPS))


def test_sigterm_saves_the_current_step_and_exits_75(data_dir, cache, reference, tmp_path):
    workdir = tmp_path / "preempted"
    out = run(data_dir, cache, workdir, "--no_eval", fault="term@step:5")
    assert out.returncode == faults.EXIT_PREEMPTED, out.stderr
    assert "preempted (SIGTERM) at step 5: checkpoint step 5 is committed" in out.stderr
    assert 5 in checkpoint.Checkpointer(str(workdir), read_only=True).all_steps()  # not a multiple of checkpoint.every
    out = run(data_dir, cache, workdir, "--no_eval")
    assert out.returncode == 0 and "resumed from step 5" in out.stderr, out.stderr
    assert history(workdir) == history(reference)


def test_nonfinite_stop_saves_the_last_good_state(data_dir, cache, reference, tmp_path):
    workdir = tmp_path / "nan_stop"
    out = run(data_dir, cache, workdir, "--no_eval", "--config.checkpoint.every=4", fault="nan@batch:7")
    assert out.returncode == faults.EXIT_NONFINITE, out.stderr
    assert "non-finite loss or gradient at step 7" in out.stderr and "checkpoint step 6" in out.stderr
    assert "Traceback" not in out.stderr
    config = tiny_config(data_dir)
    saved = restored_params(config, workdir, 6)  # every=4: step 6 was saved by the fault handler
    assert saved["step"] == 6 and saved["skipped"] == 0
    assert_same_tree(saved["params"], restored_params(config, reference, 6)["params"])
    assert max(s for s, _ in history(workdir)) == 6


def test_nonfinite_skip_counts_and_stops_past_the_limit(data_dir, cache, reference, tmp_path):
    workdir = tmp_path / "nan_skip"
    out = run(data_dir, cache, workdir, "--no_eval", "--config.faults.nonfinite=skip",
              "--config.faults.max_skipped_steps=1", fault="nan@batch:3,nan@batch:6")
    assert out.returncode == faults.EXIT_NONFINITE, out.stderr
    assert "step 3: non-finite loss or gradient; update skipped (1 skipped so far)" in out.stderr
    assert "2 steps had non-finite values, more than faults.max_skipped_steps=1" in out.stderr
    records = {r["step"]: r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl"))}
    assert history(workdir)[:2] == history(reference)[:2]
    assert np.isnan(records[3]["loss"]) and records[3]["skipped_steps"] == 1 and records[5]["skipped_steps"] == 1
    assert np.isfinite(records[4]["loss"])
    state = restored_params(tiny_config(data_dir, "faults.nonfinite=skip"), workdir, 6)
    assert state["skipped"] == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def _copy(reference, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    return workdir


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data_dir, reference, tmp_path, capsys):
    workdir = _copy(reference, tmp_path)
    step_dir = workdir / "checkpoints" / str(STEPS)
    largest = max((p for p in step_dir.rglob("*") if p.is_file() and "state" in p.parts), key=os.path.getsize)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit: Orbax alone would restore it silently
    largest.write_bytes(bytes(data))
    config = tiny_config(data_dir)
    summary = train.train(config, str(workdir), evaluate=False, quiet=True)
    err = capsys.readouterr().err
    assert f"checkpoint step {STEPS} in {workdir / 'checkpoints'} is damaged" in err
    assert "does not match its checksum" in err and "falling back to step 6" in err
    assert summary["start_step"] == 6 and glob.glob(str(workdir / "checkpoints_corrupt" / f"{STEPS}-*"))
    assert_same_tree(jax.device_get(summary["state"]["params"]), restored_params(config, reference, STEPS)["params"])


def test_truncated_or_missing_files_fail_verification(reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    step_dir = str(workdir / "checkpoints" / "6")
    assert checkpoint.verify(step_dir) is None
    files = sorted(p for p in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(p))
    with open(files[-1], "r+b") as f:
        f.truncate(os.path.getsize(files[-1]) // 2)
    assert "bytes," in checkpoint.verify(step_dir)
    os.remove(files[-1])
    assert "is missing" in checkpoint.verify(step_dir)


def test_checkpoint_of_another_config_is_an_error_naming_the_parameter(data_dir, reference, tmp_path):
    workdir = _copy(reference, tmp_path)
    before = checkpoint.checksums(str(workdir / "checkpoints" / str(STEPS)))
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.train(tiny_config(data_dir, "model.width=48"), str(workdir), evaluate=False, quiet=True)
    message = str(err.value)
    assert f"checkpoint step {STEPS}" in message and "params/decoder/embed/kernel has shape (32, 32)" in message
    assert "in the checkpoint and" in message and "model.width: 32 in the run that wrote it, 48 now" in message
    assert checkpoint.checksums(str(workdir / "checkpoints" / str(STEPS))) == before
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted(os.listdir(reference / "checkpoints"))


def _folder(tmp_path, broken: bool):
    from PIL import Image

    folder = tmp_path / ("broken" if broken else "clean")
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"picture {i}")
    if broken:
        (folder / "07.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header and nothing else
    return folder


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_corrupt_record_stops_with_its_index_or_is_skipped_in_place(tmp_path, policy):
    from maskjax.data import pipeline, sources

    def loader(broken):
        config = load_config("flip_digits.py:tiny", "data.name=maskjax_image_text_folder",
                             f"data.manual_dir={_folder(tmp_path, broken)}", "data.channels=3",
                             "data.mean=(0.5, 0.5, 0.5)", "data.std=(0.5, 0.5, 0.5)", "batch_size=8",
                             f"faults.bad_records={policy}", data_dir=str(tmp_path / f"tfds_{broken}"))
        return pipeline.train_loader(config, captions=True)

    clean, broken = loader(False), loader(True)
    src = broken.source
    index = next(i for i in range(len(src)) if src[i]["name"] in ("07", b"07"))  # TFDS shuffles on write
    order = sources.GlobalOrder(len(src), 0, shuffle=True)(np.arange(len(src)))
    slot = int(np.flatnonzero(order == index)[0])  # where the broken record sits in the first epoch
    if policy == "stop":
        with pytest.raises(sources.DataError, match=rf"record {index} of 'maskjax_image_text_folder': 'image' is "
                                                      r"not a readable image"):
            for _ in range(3):
                next(broken)
        return
    for b in range(3):
        want, got = next(clean), next(broken)
        rows = [r for r in range(8) if b * 8 + r != slot]
        np.testing.assert_array_equal(got["image"][rows], want["image"][rows])  # every other record in place
        assert got["text"].shape == want["text"].shape  # (each folder trains its own caption vocabulary)
    assert broken.bad_records == 1 and broken.get_state()["bad_records"] == 1


def test_a_reader_leaves_a_live_runs_unfinished_save_alone(tmp_path):
    """eval, export, teachers and reports open checkpoints read-only: a step still being written (here
    Orbax's temporary directory of a save in progress) is not theirs to clean up, or reading a live run
    would delete its save. The writer removes such leftovers when it starts."""
    pending = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1764633600000000"
    (pending / "state").mkdir(parents=True)
    (pending / "state" / "part").write_bytes(b"written so far")
    def gone_within(seconds):  # Orbax removes leftovers on a background thread (~0.1 s here)
        deadline = time.monotonic() + seconds
        while pending.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not pending.exists()

    reader = checkpoint.Checkpointer(str(tmp_path / "run"), read_only=True)
    assert reader.all_steps() == []
    assert not gone_within(2.0)
    reader.close()
    assert (pending / "state" / "part").read_bytes() == b"written so far"
    writer = checkpoint.Checkpointer(str(tmp_path / "run"))
    assert gone_within(60.0)
    writer.close()
