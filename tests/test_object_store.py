"""gs:// workdirs against a real GCS JSON-API server on 127.0.0.1 (tests/gcs_server.py), started and
stopped here: training, SIGKILL and bit-identical resume, eval and export reading and writing the bucket,
and the server going away in the middle of a checkpoint save. No maskjax I/O is mocked: gcsfs (through
maskjax.storage and etils.epath) and tensorstore's gcs driver (Orbax's arrays) speak HTTP to the server."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maskjax import checkpoint, metrics, storage
from tests.conftest import ROOT
from tests.gcs_server import GcsServer
from tests.test_faults import STEPS, _args, _env, assert_same_tree, cache, history, reference, restored_params, \
    run, tiny_config  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = GcsServer(tmp_path_factory.mktemp("gcs")).start()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_buckets = iter(range(1000))


@pytest.fixture
def bucket(gcs):
    return gcs.create_bucket(f"maskjax-{os.getpid()}-{next(_buckets)}")


def test_storage_layer_reads_writes_lists_and_moves_objects(bucket):
    storage.write_text(f"{bucket}/a/config.json", '{"x": 1}')
    assert json.loads(storage.read_text(f"{bucket}/a/config.json")) == {"x": 1}
    out = storage.Appender(f"{bucket}/a/metrics.jsonl", flush_secs=3600)
    out.write("1\n")
    out.write("2\n")
    assert not storage.exists(f"{bucket}/a/metrics.jsonl")  # batched: one object rewrite per flush
    out.flush()
    storage.append_text(f"{bucket}/a/metrics.jsonl", "3\n")  # a later appender keeps what is there
    assert storage.read_text(f"{bucket}/a/metrics.jsonl") == "1\n2\n3\n"
    assert storage.listdir(bucket) == ["a"] and storage.isdir(f"{bucket}/a")
    assert storage.listdir(f"{bucket}/a") == ["config.json", "metrics.jsonl"]
    digests = storage.digests(f"{bucket}/a")
    assert set(digests) == {"config.json", "metrics.jsonl"} and digests["metrics.jsonl"][0] == 6
    assert all(d.startswith(("crc32c:", "md5Hash:")) for _, d in digests.values())  # the store's own checksums
    storage.write_text(f"{bucket}/a/metrics.jsonl", "changed\n")
    assert storage.digests(f"{bucket}/a")["metrics.jsonl"] != digests["metrics.jsonl"]
    storage.move(f"{bucket}/a", f"{bucket}/b/a")
    assert not storage.exists(f"{bucket}/a/config.json") and storage.files(f"{bucket}/b") == {
        "a/config.json": 8, "a/metrics.jsonl": 8}
    storage.remove(f"{bucket}/b")
    assert storage.listdir(bucket) == []
    with pytest.raises(FileNotFoundError):
        storage.read_text(f"{bucket}/nothing")


@pytest.mark.slow
def test_gs_workdir_trains_is_killed_and_resumes_bit_identically(data_dir, cache, reference, bucket):
    """The fault test of test_faults.py with the workdir in the bucket: SIGKILL during the step, during a
    checkpoint save and during the evaluation, then one run to the end = the local uninterrupted run."""
    workdir = f"{bucket}/run"
    kills = ["kill@step:3", "kill@checkpoint:4", "kill@eval:1"]
    for fault in kills:
        out = run(data_dir, cache, workdir, fault=fault)
        assert out.returncode == -signal.SIGKILL, (fault, out.stderr[-2000:])
    assert not storage.exists(f"{workdir}/eval.json")
    out = run(data_dir, cache, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {STEPS} in {workdir}/checkpoints" in out.stderr
    got = [(r["step"], r["loss"]) for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")]
    assert got == history(reference)
    config = tiny_config(data_dir)
    assert_same_tree(restored_params(config, workdir, STEPS), restored_params(config, reference, STEPS))
    evaluated = json.loads(storage.read_text(f"{workdir}/eval.json"))
    assert evaluated["pretrained"] == json.loads((reference / "eval.json").read_text())["pretrained"]
    assert len(metrics.read_jsonl(f"{workdir}/runs.jsonl")) == len(kills) + 1
    names = storage.files(workdir)
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert f"reconstructions/step_{STEPS:07d}.png" in names
    # every kept step is committed and carries checksums of the store's digests, which verify
    for step in checkpoint.Checkpointer(workdir, read_only=True).all_steps():
        assert f"checkpoints/{step}/commit_success.txt" in names and f"checkpoints/{step}/maskjax_checksums.json" in names
        assert checkpoint.verify(f"{workdir}/checkpoints/{step}") is None


@pytest.mark.slow
def test_eval_and_export_read_from_and_write_to_the_bucket(data_dir, cache, reference, bucket, tmp_path):
    """A run copied into the bucket is evaluated there (eval.json in the bucket, same numbers), exported
    to the bucket as a Hugging Face directory, and that export is the one written from the local run."""
    storage.copy_tree(str(reference), f"{bucket}/run")
    env = _env(cache)
    out = subprocess.run([sys.executable, "-m", "maskjax", "eval", "--workdir", f"{bucket}/run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(storage.read_text(f"{bucket}/run/eval.json"))
    assert got["pretrained"] == json.loads((reference / "eval.json").read_text())["pretrained"]
    for workdir, target in ((f"{bucket}/run", f"{bucket}/export"), (str(reference), str(tmp_path / "export"))):
        out = subprocess.run([sys.executable, "-m", "maskjax", "export", "--workdir", workdir, "--format", "hf",
                              "--out", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    assert storage.files(f"{bucket}/export") == storage.files(str(tmp_path / "export"))
    from safetensors.numpy import load

    remote = load(storage.read_bytes(f"{bucket}/export/model.safetensors"))
    local = load((tmp_path / "export" / "model.safetensors").read_bytes())
    assert remote.keys() == local.keys()
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name])
    # and a run starts from the export in the bucket as from the local one
    from maskjax import train

    first = [train.train(tiny_config(data_dir, f"init_from={source}", "total_steps=1",
                                     "optim.warmup_steps=0"),
                         str(tmp_path / f"init_{i}"), evaluate=False, quiet=True)["losses"]
             for i, source in enumerate((f"{bucket}/export", str(tmp_path / "export")))]
    scratch = train.train(tiny_config(data_dir, "total_steps=1", "optim.warmup_steps=0"), str(tmp_path / "scratch"),
                          evaluate=False, quiet=True)["losses"]
    assert first[0] == first[1] and len(first[0]) == 1 and first[0] != scratch  # the weights came from the bucket


@pytest.mark.slow
def test_server_stopped_during_a_checkpoint_save_loses_nothing_committed(data_dir, cache, reference, gcs, bucket):
    """The run is frozen (SIGSTOP) right after the save of step 4 starts, the server is stopped, the run
    goes on: one error line naming the checkpoint and the bucket, exit status 6 (run again once the store
    is back). With the server back, step 2 is intact and a rerun ends where the uninterrupted run ends."""
    workdir = f"{bucket}/run"
    process = subprocess.Popen(_args(data_dir, workdir), cwd=ROOT, env=_env(cache, "stop@checkpoint:4"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _state(process.pid) != "T":
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    gcs.stop()
    try:
        os.kill(process.pid, signal.SIGCONT)
        _, err = process.communicate(timeout=300)
    finally:
        gcs.start()
    lines = [line for line in err.strip().splitlines() if line.startswith("maskjax: error:")]
    assert process.returncode == storage.EXIT_STORAGE, err[-3000:]
    # what fails first (the checkpoint's arrays, or the metrics flushed after the save) names itself
    assert len(lines) == 1 and "could not write" in lines[0] and workdir in lines[0], err[-3000:]
    assert "Traceback" not in err
    committed = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
    assert committed in ([2], [2, 4]), committed
    assert all(checkpoint.verify(f"{workdir}/checkpoints/{step}") is None for step in committed)
    out = run(data_dir, cache, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {committed[-1]} in {workdir}/checkpoints" in out.stderr
    assert [(r["step"], r["loss"]) for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == history(reference)
    config = tiny_config(data_dir)
    assert_same_tree(restored_params(config, workdir, STEPS), restored_params(config, reference, STEPS))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_a_data_dir_in_the_bucket_is_staged_to_each_host_and_trains_the_same(data_dir, bucket, tmp_path, monkeypatch):
    """TFDS data in the bucket: the dataset is copied once to the host's cache (array_record is read by
    C++ from local files), a second use copies nothing, and a run on it equals the run on the local data."""
    from maskjax import train
    from maskjax.data import sources
    from tests.conftest import load_config

    monkeypatch.setenv("MASKJAX_CACHE_DIR", str(tmp_path / "cache"))
    storage.copy_tree(os.path.join(data_dir, "maskjax_digits"), f"{bucket}/data/maskjax_digits")
    remote = load_config("mae_digits.py:tiny", "total_steps=3", "log_every=1", data_dir=f"{bucket}/data")
    local = sources.data_dir(remote.data)
    assert local.startswith(str(tmp_path / "cache")) and local.endswith(f"{bucket[5:]}/data")
    staged = os.path.join(local, "maskjax_digits")
    version = sorted(os.listdir(staged))[0]
    shards = [n for n in os.listdir(os.path.join(staged, version)) if ".array_record-" in n]
    before = {n: os.stat(os.path.join(staged, version, n)).st_mtime_ns for n in shards}
    sources._staged.clear()
    assert sources.data_dir(remote.data) == local  # complete: nothing is copied again
    assert before == {n: os.stat(os.path.join(staged, version, n)).st_mtime_ns for n in shards}
    got = train.train(remote, f"{bucket}/run", evaluate=False, quiet=True)["losses"]
    want = train.train(load_config("mae_digits.py:tiny", "total_steps=3", "log_every=1", data_dir=data_dir),
                       str(tmp_path / "local"), evaluate=False, quiet=True)["losses"]
    assert got == want and len(got) == 3
    with pytest.raises(sources.DataError, match="'imagenet2012' is not prepared in data_dir 'gs://"):
        sources.data_dir(load_config("mae_digits.py:tiny", "data.name=imagenet2012", data_dir=f"{bucket}/data").data)


@pytest.mark.slow
def test_a_sweep_directory_in_the_bucket_runs_resumes_and_reports(data_dir, bucket, tmp_path):
    from maskjax import cli, sweep

    path = tmp_path / "tiny.py"
    path.write_text("CONFIG = 'configs/mae_digits.py:tiny'\n"
                    "def get_sweep():\n"
                    "    return [{'model.depth': 1}, {'data.name': 'not_prepared_here'}]\n")
    workdir = f"{bucket}/sweep"
    args = ["sweep", "--sweep", str(path), "--workdir", workdir, f"--config.data.data_dir={data_dir}",
            "--config.eval.max_batches=1"]
    assert cli.main(args) == 1  # the second point fails
    index = json.loads(storage.read_text(f"{workdir}/sweep.json"))
    assert [p["status"] for p in index["points"]] == ["done", "failed"]
    done = index["points"][0]["workdir"]
    assert done.startswith(f"{workdir}/points/") and sweep.finished(done)
    first = storage.digests(done)["eval.json"]
    assert cli.main(args) == 1 and storage.digests(done)["eval.json"] == first  # not redone
    assert "not_prepared_here" in storage.read_text(f"{workdir}/logs/{index['points'][1]['name']}.log")
    out = sweep.report(workdir)
    assert [p["status"] for p in out["points"]] == ["done", "failed"]
    names = storage.files(workdir)
    for name in ("report.json", "report.csv", "loss_curves.png"):
        assert names.get(name, 0) > 0, name


def test_a_tokenizer_file_in_the_bucket_is_read_through_the_cache(bucket, tmp_path, monkeypatch):
    from maskjax.data import tokenizer

    monkeypatch.setenv("MASKJAX_CACHE_DIR", str(tmp_path / "cache"))
    pieces = [*tokenizer.WORDPIECE_SPECIALS, "the", "digit", "##s", "seven"]
    storage.write_text(f"{bucket}/vocab/vocab.txt", "\n".join(pieces) + "\n")
    remote = tokenizer.load(f"{bucket}/vocab/vocab.txt")
    local = tokenizer.load(storage.local_copy(f"{bucket}/vocab/vocab.txt"))
    assert remote.pieces == local.pieces == pieces and remote.path.startswith(str(tmp_path / "cache"))
    with pytest.raises(tokenizer.TokenizerError, match="does not exist"):
        tokenizer.load(f"{bucket}/vocab/missing.txt")


@pytest.mark.slow
def test_two_processes_checkpoint_into_the_bucket_and_one_process_resumes(data_dir, bucket, tmp_path):
    """A pod's shape: every process writes its shards of the checkpoint to the bucket through tensorstore,
    process 0 the rest; then a single process (a smaller slice) resumes from the bucket and ends with the
    losses of an uninterrupted one-process run."""
    from maskjax import train
    from tests.conftest import load_config
    from tests.test_distributed import FEW_STEPS, MAE, launch

    workdir = f"{bucket}/pod"
    first, _ = launch(tmp_path, "pod", ["train", "--config", MAE, "--workdir", workdir, "--stop_at=3", "--no_eval",
                                        f"--config.data.data_dir={data_dir}", *FEW_STEPS])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [3]
    assert checkpoint.verify(f"{workdir}/checkpoints/3") is None
    shards = [n for n in storage.files(f"{workdir}/checkpoints/3") if n.startswith("state/ocdbt.process_")]
    assert {n.split("/")[1] for n in shards} == {"ocdbt.process_0", "ocdbt.process_1"}  # both processes wrote
    config = load_config("mae_digits.py", *(a.removeprefix("--config.") for a in FEW_STEPS), data_dir=data_dir)
    resumed = train.train(config, workdir, evaluate=False, quiet=True)
    assert resumed["start_step"] == 3
    train.train(config, str(tmp_path / "one"), evaluate=False, quiet=True)
    got = [(r["step"], r["loss"]) for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")]
    want = [(r["step"], r["loss"]) for r in metrics.read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))]
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=0, atol=1e-5)
