"""The bad-input catalogue: each bad flag, config, dataset, record or file gives one ``maskjax: error:`` line
naming the offending thing, a non-zero exit status, no traceback (unless --debug), and leaves the existing
checkpoints of the workdir untouched. Cases run through ``cli.main`` in this process (one JAX start);
test_config.py and the disk-full case below check the same through a real subprocess."""
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from maskjax import checkpoint, cli, train
from tests.conftest import ROOT, load_config

TINY = "configs/mae_digits.py:tiny"
FOLDER = ["--config.data.name=maskjax_image_text_folder", "--config.data.channels=3",
          "--config.data.mean=(0.5, 0.5, 0.5)", "--config.data.std=(0.5, 0.5, 0.5)"]


def _images(folder, n, caption=lambda i: f"picture {i}", broken=()):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"{i:02d}.png"
        if i in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        (folder / f"{i:02d}.txt").write_text(caption(i))
    return folder


@pytest.fixture(scope="module")
def env(data_dir, tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4, and the folders the dataset cases read."""
    root = tmp_path_factory.mktemp("bad_input")
    workdir = root / "run"
    config = load_config("mae_digits.py:tiny", "checkpoint.every=2", data_dir=data_dir)
    train.train(config, str(workdir), stop_at=4, evaluate=False, quiet=True)
    _images(root / "broken", 8, broken=(3,))
    _images(root / "empty_captions", 8, caption=lambda i: "")
    lonely = _images(root / "lonely", 2)
    (lonely / "extra.png").write_bytes((lonely / "00.png").read_bytes())
    (root / "not_a_dir").write_text("a file")
    (root / "bad_config.py").write_text("def get_config(:\n")
    (root / "no_get_config.py").write_text("X = 1\n")
    (root / "run_broken_json").mkdir()
    (root / "run_broken_json" / "config.json").write_text("{not json")
    (root / "run_list_json").mkdir()
    (root / "run_list_json" / "config.json").write_text("[1]")
    from maskjax.data import text

    vocab = text.tokenizer_path(load_config("mlm_text.py:tiny", data_dir=data_dir).data)
    return {"workdir": str(workdir), "root": str(root), "data": data_dir, "vocab": vocab}


# (id, argv with {workdir} {root} {data} {vocab} placeholders, text the one error line must contain)
CASES = [
    # command line
    ("unknown command", ["trian"], "invalid choice: 'trian'"),
    ("missing workdir", ["train", "--config", TINY], "required: --workdir"),
    ("unknown flag", ["train", "--config", TINY, "--workdir", "{workdir}", "--stepz", "3"], "unrecognized arguments: --stepz"),
    ("stop_at zero", ["train", "--config", TINY, "--workdir", "{workdir}", "--stop_at", "0"], "--stop_at 0 must be >= 1"),
    ("override without value", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.model.depth"],
     "--config.model.depth needs a value"),
    ("coordinator without count", ["train", "--config", TINY, "--workdir", "{workdir}", "--coordinator", "h:1234"],
     "--num_processes is needed with --coordinator"),
    ("bench zero steps", ["bench", "--config", TINY, "--steps", "0"], "--steps 0 must be >= 1"),
    ("bench bad sweep", ["bench", "--config", TINY, "--sweep", "mask_ratio"], "--sweep 'mask_ratio'"),
    ("compile-check bad mesh", ["compile-check", "--config", TINY, "--mesh", "data=8,pipe=2"], "--mesh 'data=8,pipe=2'"),
    ("compile-check bad memory", ["compile-check", "--config", TINY, "--device_memory", "12 parsecs"], "--device_memory"),
    ("sample on an MAE run", ["sample", "--workdir", "{workdir}"], "run, which cannot sample (objectives that can: mage, maskgit, mdlm)"),
    ("eval of a missing step", ["eval", "--workdir", "{workdir}", "--step", "3"], "has no checkpoint at step 3"),
    ("eval without config", ["eval", "--workdir", "{root}/nowhere"],
     "--workdir: '{root}/nowhere' has no config.json (not a maskjax run, or not started yet); pass --config"),
    ("eval of broken config.json", ["eval", "--workdir", "{root}/run_broken_json"], "config.json: not a readable config"),
    ("eval of a config.json that is a list", ["eval", "--workdir", "{root}/run_list_json"],
     "config.json: not a readable config (a JSON list, not an object)"),
    # config files and values
    ("missing config file", ["train", "--config", "configs/nope.py", "--workdir", "{workdir}"], "'configs/nope.py' does not exist"),
    ("config syntax error", ["train", "--config", "{root}/bad_config.py", "--workdir", "{workdir}"], "failed to load: SyntaxError"),
    ("config without get_config", ["train", "--config", "{root}/no_get_config.py", "--workdir", "{workdir}"], "has no get_config()"),
    ("unknown variant", ["train", "--config", "configs/mae_digits.py:huge", "--workdir", "{workdir}"], "unknown variant 'huge'"),
    ("unknown config key", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.model.depthh=3"],
     "config.model.depthh: unknown key"),
    ("wrongly typed value", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.model.depth=deep"], "config.model.depth"),
    ("unknown objective", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.objective=bert_wrong"],
     "unknown objective 'bert_wrong'"),
    ("batch not divisible by mesh", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.batch_size=30"],
     "config.batch_size: 30"),
    ("mask ratio 1", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.mask.ratio=1.0"], "config.mask"),
    ("unknown fault policy", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.faults.nonfinite=ignore"],
     "config.faults.nonfinite"),
    ("mesh of 3 devices", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.mesh.data=3"], "config.mesh"),
    ("maskgit without its tokenizer", ["train", "--config", "configs/maskgit_digits.py", "--workdir", "{workdir}",
                                       "--config.maskgit.tokenizer={root}/no_vq"],
     "maskgit.tokenizer: '{root}/no_vq' has no config.json"),
    ("maskgit over a non-vq run", ["train", "--config", "configs/maskgit_digits.py", "--workdir", "{root}/other",
                                   "--config.maskgit.tokenizer={workdir}"], "is a 'mae' run, not 'vq'"),
    # datasets and records
    ("dataset not prepared", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.data.name=mnist"],
     "dataset 'mnist' is not prepared in data_dir"),
    ("wrong data_dir", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.data.name=imagenet2012",
                        "--config.data.data_dir={root}/no_such_dir"], "is not prepared in data_dir '{root}/no_such_dir'"),
    ("unknown split", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.data.train_split=training",
                       "--config.data.data_dir={data}"], "has no split 'training'"),
    ("wrong image channels", ["train", "--config", TINY, "--workdir", "{root}/fresh1", "--config.data.data_dir={data}",
                              "--config.data.channels=3", "--config.data.mean=(0.5, 0.5, 0.5)",
                              "--config.data.std=(0.5, 0.5, 0.5)"], "does not have data.channels=3 channels"),
    ("wrong image field", ["train", "--config", TINY, "--workdir", "{root}/fresh2", "--config.data.data_dir={data}",
                           "--config.data.image_key=img"], "has no field data.image_key='img'"),
    ("corrupt image bytes", ["train", "--config", TINY, "--workdir", "{root}/fresh3", *FOLDER,
                             "--config.data.manual_dir={root}/broken", "--config.data.data_dir={root}/tfds_broken",
                             "--config.batch_size=8"], "of 'maskjax_image_text_folder': 'image' is not a readable image"),
    ("empty text", ["train", "--config", "configs/mlm_text.py:tiny", "--workdir", "{root}/fresh4",
                    "--config.data.name=maskjax_image_text_folder", "--config.data.text_key=caption",
                    "--config.data.manual_dir={root}/empty_captions", "--config.data.data_dir={root}/tfds_empty",
                    "--config.data.tokenizer={vocab}"], "is empty: its first 8 documents have no text"),
    ("folder missing", ["train", "--config", TINY, "--workdir", "{root}/fresh5", *FOLDER,
                        "--config.data.manual_dir={root}/nowhere", "--config.data.data_dir={root}/tfds_none"],
     "data.manual_dir='{root}/nowhere' is not a folder"),
    ("image without caption", ["train", "--config", TINY, "--workdir", "{root}/fresh6", *FOLDER,
                               "--config.data.manual_dir={root}/lonely", "--config.data.data_dir={root}/tfds_lonely"],
     "extra.png' has no caption file"),
    ("tokenizer file missing", ["train", "--config", "configs/mlm_text.py:tiny", "--workdir", "{root}/fresh7",
                                "--config.data.data_dir={data}", "--config.data.tokenizer={root}/nope.txt"], "nope.txt"),
    # files, workdirs, checkpoints
    ("workdir is a file", ["train", "--config", TINY, "--workdir", "{root}/not_a_dir"], "is not writable"),
    ("workdir inside a file", ["train", "--config", TINY, "--workdir", "{root}/not_a_dir/run"], "is not writable"),
    ("checkpoint of another model", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.data.data_dir={data}",
                                     "--config.model.width=48"], "model.width: 32 in the run that wrote it, 48 now"),
    ("malformed fault spec", ["train", "--config", TINY, "--workdir", "{workdir}", "--config.data.data_dir={data}"],
     "MASKJAX_FAULTS item 'explode@step:3'"),
]


def _fill(item, env):
    return item.format(**env)


def _snapshot(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return {step: checkpoint.checksums(os.path.join(directory, step)) for step in sorted(os.listdir(directory))}


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(name, argv, needle, env, capsys, monkeypatch):
    if name == "malformed fault spec":
        monkeypatch.setenv("MASKJAX_FAULTS", "explode@step:3")
    before = _snapshot(env["workdir"])
    status = cli.main([_fill(a, env) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("maskjax: error:")]
    assert status != 0, err
    assert len(errors) == 1 and _fill(needle, env) in errors[0], err
    assert "Traceback" not in err
    assert _snapshot(env["workdir"]) == before


def test_catalogue_is_at_least_thirty_cases():
    assert len(CASES) + 1 >= 30  # + the disk-full case below


@pytest.mark.library_paths
def test_debug_shows_the_traceback(env):
    with pytest.raises(Exception, match="unknown key"):
        cli.main(["train", "--config", TINY, "--workdir", env["workdir"], "--config.model.depthh=3", "--debug"])


def _no_big_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(env, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(env["workdir"], workdir)
    before = _snapshot(str(workdir))
    out = subprocess.run([sys.executable, "-m", "maskjax", "train", "--config", TINY, "--workdir", str(workdir),
                          "--no_eval", "--config.checkpoint.every=2", f"--config.data.data_dir={env['data']}"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         preexec_fn=_no_big_files, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("maskjax: error:")]
    assert out.returncode == 2, out.stderr
    assert len(errors) == 1 and "could not write checkpoint step 6" in errors[0] and "File too large" in errors[0]
    assert "Traceback" not in out.stderr
    after = _snapshot(str(workdir))
    assert {k: v for k, v in after.items() if k in before} == before and "6" not in after
