"""Test set-up: 8 virtual CPU devices (set before JAX is imported) and one prepared data_dir."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the whole suite: the pytest workers and every process a
# test starts (train, sweep, multi-process runs) compile the same small programs again and again.
# A cached executable is the same program, so results (and bit-identical resume) are unchanged.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# Whole modules of end-to-end tests: multi-process runs, fault injection, exports checked against
# transformers, equivalence with PyTorch peers, sweeps, full training runs.
SLOW_MODULES = {"test_distributed", "test_faults", "test_interop", "test_equivalence", "test_sweep", "test_train"}


# Tests elsewhere that train for a few steps, start a process or compile a whole model: each took
# 10 s or more on 2 cores (AMD EPYC, `pytest --durations`), which the quick tier cannot afford.
SLOW_TESTS = {
    "test_generator_properties[block]", "test_generator_properties[filtered_noise]",
    "test_hpm_hard_share_follows_its_schedule", "test_the_command_runs_with_huge_page_malloc",
    "test_a_few_steps_on_a_fixed_batch_reduce_the_loss", "test_hog_targets_train",
    "test_dual_masking_trains_at_a_high_decoder_ratio", "test_scan_keeps_the_program_flat_in_depth",
    "test_auto_attention_asks_jax_for_cudnn_on_a_gpu_in_bfloat16", "test_mae_loss_is_the_masked_mse_of_the_drawn_mask",
    "test_remat_gives_the_same_values_and_gradients", "test_encoder_shapes_and_dtypes",
    "test_span_lengths_follow_spanbert_truncated_geometric", "test_xla_attention_values_and_gradients_match_jax",
    "test_text_encoder_shapes_names_and_tied_output", "test_attention_option_reaches_every_block_and_xla_matches_auto_on_cpu",
    "test_spans_cover_whole_words_except_the_cut_at_the_budget", "test_output_shapes_and_reconstruction",
    "test_packed_documents_never_see_each_other", "test_a_vision_train_step_with_splash_equals_xla",
}


# End-to-end modules: they run the library's own paths (train, eval, sweep), which must enter their run's
# mesh themselves (Setup.activations), so no context is given there; nor to tests marked library_paths.
OWN_MESH_MODULES = {"test_train", "test_faults", "test_distributed", "test_sweep"}


@pytest.fixture(autouse=True)
def unconstrained_models(request):
    """Unit tests call layers and objectives directly on one device, so they say so: no activation
    constraints. Outside any context ``sharding.constrain`` raises (tests/test_models.py checks it), so
    in end-to-end tests a library path that forgets its mesh fails."""
    from maskjax import sharding

    module = request.node.module.__name__.rpartition(".")[2]
    if module in OWN_MESH_MODULES or request.node.get_closest_marker("library_paths"):
        yield
        return
    with sharding.activation_mesh(None):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "library_paths: runs the library's own train/eval paths, so the test gets "
                                       "no implicit (unconstrained) mesh context")
    config.addinivalue_line("markers", "slow: runs a process, a training run, a dataset or a full-size model; "
                                       "`make test-fast` leaves these out, `make test` runs everything")


def pytest_collection_modifyitems(config, items):
    """Slow: marked so, in a slow module, or needing the prepared datasets (``data_dir``: preparing them
    alone takes a minute)."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in SLOW_MODULES or item.name in SLOW_TESTS or item.originalname in SLOW_TESTS \
                or "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with every embedded dataset prepared once for the whole run: the pytest-xdist
    workers share it (the first prepares it under a lock, the others find it prepared)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    path = str(root / "tensorflow_datasets")
    os.environ["MASKJAX_DATA_DIR"] = path
    from maskjax.data import sources

    with open(root / "tensorflow_datasets.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for builder in sources.EMBEDDED.values():
            b = builder(data_dir=path, file_format="array_record")
            if not b.is_prepared():
                b.download_and_prepare()
    return path


def load_config(name: str, *overrides: str, data_dir: str | None = None):
    """configs/<name> with overrides; ``data_dir`` points the run at the session's prepared data."""
    from maskjax import config as config_lib

    config = config_lib.load(os.path.join(ROOT, "configs", name))
    items = list(overrides) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    return config_lib.override(config, items)


def random_images(config, batch: int = 3, seed: int = 0):
    """Standard-normal images [batch, H, W, C] of ``config``'s shape (float32), the same for a seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
    return rng.normal(size=shape).astype(np.float32)


def to_torch_images(images):
    """[B, H, W, C] NumPy images as the [B, C, H, W] torch tensor transformers' vision models take."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def perturbed(params, seed=0, scale=0.05):
    """Host parameters moved off their initial values (zero biases and unit scales take part)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(np.float32), params)


def perturbed_setup(config, seed=0):
    """(objective, graphdef, perturbed host params) of a config's model."""
    from flax import nnx

    from maskjax import objectives

    objective = objectives.get(config)
    graphdef, state = nnx.split(objective.build(nnx.Rngs(0)))
    return objective, graphdef, perturbed(nnx.to_pure_dict(state), seed)


def text_batch(objective, batch=4, seed=5):
    """A host batch of random word pieces, one document per row ([CLS] ... [SEP], no padding)."""
    import numpy as np

    tok, length = objective.tokenizer, objective.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(max(tok.special_ids) + 1, tok.vocab_size, (batch, length)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = tok.cls_id, tok.sep_id
    maskable = np.ones((batch, length), bool)
    maskable[:, [0, -1]] = False
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
            "word_start": rng.uniform(size=tokens.shape) < 0.7, "maskable": maskable}
