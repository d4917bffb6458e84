"""``maskjax bench``: analytic FLOPs against XLA's count, the JSON fields, sweeps and bad flags.
Speed targets are measured with the benchmark and written in docs/performance.md, never asserted."""
import glob
import json
import math
import os

import jax
import pytest

from maskjax import step as step_lib
from maskjax import aot, bench, cli, config as config_lib
from tests.conftest import ROOT, load_config

WIDE = 256  # wide enough that matmuls dominate: norms, GELU, softmax and Adam are O(width) per token


@pytest.mark.parametrize("name,overrides", [
    ("mae_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1"]),
    ("simmim_digits.py:tiny", []),
    ("flip_digits.py:tiny", [f"text_model.width={WIDE}", "text_model.depth=1"]),
    ("videomae_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1"]),
    # 32x32 clips: at 16x16 the decoder sees 19 tokens and Adam and elementwise work exceed the 5%
    ("videomae_digits.py:tiny,dual", [f"decoder.width={WIDE}", "decoder.depth=1", "data.image_size=32"]),
    ("mae_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1", "hpm.enabled=True"]),
    ("videomae_digits.py:tiny,dual", [f"decoder.width={WIDE}", "decoder.depth=1", "data.image_size=32",
                                      "hpm.enabled=True"]),  # the two MAE parts composed
    ("mae_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1", "loss.target=teacher"]),  # + teacher (1x)
    # teacher forward (1x), student and conv decoder (3x), the EMA (3 per teacher parameter)
    ("data2vec_digits.py:tiny", ["data2vec.top_k=1", "data2vec.decoder_layers=2", f"data2vec.decoder_dim={WIDE}"]),
    ("vq_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1"]),  # the distances: forward only
    ("maskgit_digits.py:tiny", []),  # + the frozen tokenizer's encoder and look-up (forward only)
    ("mage_digits.py:tiny", [f"decoder.width={WIDE}", "decoder.depth=1"]),
    ("mdlm_text.py:tiny", []),
    ("electra_text.py:tiny", ["electra.embed_dim=128"]),
    ("ar_text.py:tiny", []),
])
def test_analytic_flops_match_xla_cost_analysis(data_dir, name, overrides):
    """One layer per stack (XLA counts a scanned loop body once): the analytic count (matmuls and
    attention only, 3x forward) is within 5% of XLA's whole-step count and never above it. Text: below."""
    config = load_config(name, f"model.width={WIDE}", "model.depth=1", "mesh.data=1", *overrides, data_dir=data_dir)
    setup = step_lib.build(config, devices=jax.devices()[:1])
    compiled, _, _ = aot.compile_step(setup)
    xla, analytic = aot.compiled_flops(compiled), float(setup.objective.flops())
    assert 0.95 * xla <= analytic <= xla, (analytic, xla)


def test_sparse_mlm_head_saves_the_flops_the_count_says(data_dir):
    """MLM with a sparse and a dense head (MDLM's count is the dense one): each within 5% of XLA, and
    the FLOPs the sparse head saves match XLA's difference within 5%."""
    counts = {}
    for sparse in (True, False):
        config = load_config("mlm_text.py:tiny", f"mlm.sparse={sparse}", f"model.width={WIDE}", "model.depth=1", "mesh.data=1",
                             data_dir=data_dir)
        setup = step_lib.build(config, devices=jax.devices()[:1])
        counts[sparse] = (aot.compiled_flops(aot.compile_step(setup)[0]), float(setup.objective.flops()))
        assert 0.95 * counts[sparse][0] <= counts[sparse][1] <= counts[sparse][0], counts
    xla_saved, analytic_saved = counts[False][0] - counts[True][0], counts[False][1] - counts[True][1]
    assert analytic_saved > 0 and abs(analytic_saved - xla_saved) <= 0.05 * xla_saved


FIELDS = ["compile_seconds", "step_seconds_median", "step_seconds_min", "examples_per_second",
          "examples_per_second_per_device", "tokens_per_second", "tokens_per_second_per_device",
          "data_wait_seconds_median", "data_wait_fraction", "model_flops_per_step", "achieved_tflops_per_device",
          "peak_tflops_per_device", "mfu"]


def test_bench_writes_every_field(data_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = cli.main(["bench", "--config", os.path.join(ROOT, "configs", "mae_digits.py:tiny"), "--steps", "4",
                     "--warmup", "1", "--json", str(out), f"--config.data.data_dir={data_dir}",
                     "--profile", str(tmp_path / "trace")])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(out.read_text())
    assert result["environment"]["device_count"] == 8
    (row,) = result["results"]
    for field in FIELDS:
        assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] >= 0, field
    assert row["step_seconds_min"] <= row["step_seconds_median"]
    assert row["examples_per_second"] == pytest.approx(32 / row["step_seconds_median"])
    assert row["tokens_per_second"] == pytest.approx(row["examples_per_second"] * 16)  # 16x16 image, patch 4
    assert 0 < row["data_wait_fraction"] < 1 and row["data"] == "real"
    assert row["attention"] == "xla" and "xla attention" in text  # 'auto' on CPU
    assert row["peak_source"] == "measured float32 matmul on these devices" and row["mfu"] > 0
    assert row["mfu"] == pytest.approx(row["achieved_tflops_per_device"] / row["peak_tflops_per_device"])
    assert row["peak_memory_bytes"] is None  # XLA:CPU keeps no allocator statistics
    assert "MFU %" in text and "median ms" in text
    # --profile: one more step traced; its XLA op time summed per JAX primitive, loops not double counted
    ops = {op["op"]: op for op in row["profile"]["ops"]}
    assert "dot_general" in ops and "while" not in ops and all(op["seconds"] > 0 for op in ops.values())
    assert 0 < sum(op["share"] for op in ops.values()) <= 1 + 1e-9
    assert glob.glob(str(tmp_path / "trace" / "**" / "*.trace.json.gz"), recursive=True)
    assert "profile: dot_general" in text or "% | dot_general" in text


def test_mask_ratio_sweep_rows(data_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = cli.main(["bench", "--config", os.path.join(ROOT, "configs", "mae_digits.py:tiny"), "--steps", "2",
                     "--warmup", "1", "--data", "synthetic", "--sweep", "mask_ratio=0,0.75", "--json", str(out),
                     f"--config.data.data_dir={data_dir}"])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = json.loads(out.read_text())["results"]
    assert [r["point"] for r in rows] == [{"mask.ratio": "0"}, {"mask.ratio": "0.75"}]
    assert [r["mask_ratio"] for r in rows] == [0.0, 0.75]
    assert rows[0]["model_flops_per_step"] > 1.5 * rows[1]["model_flops_per_step"]  # encoder on 16 vs 4 tokens
    assert rows[0]["data_wait_fraction"] < 0.5 and rows[0]["data"] == "synthetic"
    lines = text.replace("\r", "\n").splitlines()
    assert sum(line.strip().startswith("0.75 |") for line in lines) == 2  # as it ran, and in the final table


def test_synthetic_batches_match_the_batch_spec(data_dir):
    import numpy as np

    for name in ("mae_digits.py:tiny", "mlm_text.py:tiny", "flip_digits.py:tiny", "videomae_digits.py:tiny"):
        objective = step_lib.build(load_config(name, data_dir=data_dir)).objective
        batch = objective.synthetic_batch(np.random.default_rng(0))
        for key, (shape, dtype) in objective.batch_spec().items():
            assert batch[key].shape == shape and batch[key].dtype == np.dtype(dtype), (name, key)
        if "tokens" in batch:
            assert batch["tokens"].max() < objective.tokenizer.vocab_size


@pytest.mark.parametrize("name,peers,scan", [
    ("mae_digits.py:tiny", ["ViTMAEForPreTraining"], True),
    ("mae_digits.py:tiny", ["ViTMAEForPreTraining"], False),
    ("videomae_digits.py:tiny", ["VideoMAEForPreTraining"], True),
    ("mlm_text.py:tiny", ["BertForMaskedLM, gathered head", "BertForMaskedLM, dense head"], True),
])
def test_peer_comparison_times_both_stacks_on_the_same_weights(data_dir, tmp_path, capsys, name, peers, scan):
    """``--peer hf``: the transformers model gets maskjax's weights, so on the same batch its first loss is
    the same quantity as maskjax's (other masks: MLM's cross-entropy of a random model, MAE's error on other
    patches), and both are timed in alternating rounds."""
    out = tmp_path / "peer.json"
    code = cli.main(["bench", "--config", os.path.join(ROOT, "configs", name), "--peer", "hf", "--steps", "2",
                     "--warmup", "1", "--rounds", "2", "--json", str(out), f"--config.data.data_dir={data_dir}",
                     f"--config.model.scan_layers={scan}"])
    text = capsys.readouterr().out
    assert code == 0, text
    (row,) = json.loads(out.read_text())["results"]
    assert list(row["peers"]) == peers and len(row["step_seconds"]) == 2 and row["dtype"] == "float32"
    assert row["scan_layers"] is scan and ("layer scan" if scan else "unrolled layers") in text
    assert row["cpu"] == bench.cpu_model() and row["cpu"] in text
    for peer in peers:
        result = row["peers"][peer]
        assert len(result["ratio_per_round"]) == 2 and result["ratio_median"] > 0 and f"{peer} " in text
        assert result["ratio_median"] == pytest.approx(sorted(result["ratio_per_round"])[0] / 2
                                                       + sorted(result["ratio_per_round"])[1] / 2)
        tolerance = 0.3 if "MAE" in peer else 0.02
        assert row["first_loss"][peer] == pytest.approx(row["first_loss"]["maskjax"], rel=tolerance)
    assert "maskjax is" in text and "x as fast" in text


def test_bench_bad_flags(capsys):
    path = os.path.join(ROOT, "configs", "mae_digits.py")
    for args, message in [
        (["--sweep", "mask_ratio"], "--sweep 'mask_ratio': expected KEY=V1,V2"),
        (["--sweep", "model.nope=1,2"], "config.model.nope: unknown key"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--config.batch_size=abc"], "config.batch_size: cannot parse 'abc' as int"),
        (["--profile", path], f"--profile {path!r} is a file, not a directory"),
        (["--peer", "hf", "--sweep", "mask_ratio=0,1"], "--sweep does not combine with --peer"),
        (["--peer", "hf", "--config.model.dtype=bfloat16"],
         "config.model.dtype: 'bfloat16': --peer hf compares float32"),
        (["--peer", "hf", "--rounds", "0"], "need steps >= 1, warmup >= 0, rounds >= 1"),
    ]:
        assert cli.main(["bench", "--config", path] + args) == 2
        assert message in capsys.readouterr().err


def test_peer_needs_an_objective_with_a_pytorch_peer(capsys):
    path = os.path.join(ROOT, "configs", "mdlm_text.py:tiny")
    assert cli.main(["bench", "--config", path, "--peer", "hf"]) == 2
    err = capsys.readouterr().err
    assert "--peer hf: a 'mdlm' run has no PyTorch peer here" in err and "mae" in err and "mlm" in err
    # MAE-ST's layout is no transformers model: the key that stops it is named
    path = os.path.join(ROOT, "configs", "videomae_digits.py:tiny,st")
    assert cli.main(["bench", "--config", path, "--peer", "hf"]) == 2
    assert "config.data.frames" in capsys.readouterr().err


def test_peak_table_and_parse():
    class Device:
        device_kind, platform = "NVIDIA H100 80GB HBM3", "gpu"

    assert bench.table_peak(Device, "bfloat16") == 989e12
    assert bench.table_peak(Device, "float16") == 989e12  # tensor-core rate, not the float32 one
    assert bench.table_peak(Device, "float32") == 494e12
    Device.device_kind = "TPU v5 lite"
    assert bench.table_peak(Device, "bfloat16") == 197e12
    assert bench.parse_sweeps(["batch=64,128"]) == [("batch_size", ["64", "128"])]
    config = config_lib.override(load_config("mae_digits.py:tiny"), ["mask.ratio=0.5"])
    assert config.mask.ratio == 0.5


def test_huge_page_tunable_is_added_once_and_never_overrides_the_users():
    from maskjax import hostmem

    assert hostmem.tunables_with_huge_pages(None) == "glibc.malloc.hugetlb=1"
    assert hostmem.tunables_with_huge_pages("glibc.malloc.arena_max=2") == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostmem.tunables_with_huge_pages("glibc.malloc.hugetlb=0") is None       # the user's choice
    assert hostmem.tunables_with_huge_pages("glibc.malloc.hugetlb=1:x.y=2") is None  # already started again


def test_huge_pages_available_reads_the_kernel_setting(tmp_path):
    from maskjax import hostmem

    setting = tmp_path / "enabled"
    for text, expected in (("always [madvise] never", True), ("[always] madvise never", True),
                           ("always madvise [never]", False)):
        setting.write_text(text)
        assert hostmem.huge_pages_available(str(setting)) is expected
    assert not hostmem.huge_pages_available(str(tmp_path / "missing"))


def test_the_command_runs_with_huge_page_malloc(tmp_path):
    """`maskjax` started as a program (not called from Python) starts itself again with the tunable, and
    the bench JSON records it (a user's own setting stands: the test above)."""
    import subprocess
    import sys

    from maskjax import hostmem

    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-m", "maskjax", "bench", "--config",
                           os.path.join(ROOT, "configs", "mae_digits.py:tiny"), "--data", "synthetic", "--steps", "1",
                           "--warmup", "0", "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "glibc.malloc.hugetlb=1" if hostmem.huge_pages_available() else ""  # no THP: nothing to ask for
    assert json.loads(out.read_text())["environment"]["glibc_tunables"] == expected
