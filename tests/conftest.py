"""Test set-up: 8 virtual CPU devices (set before JAX is imported) and one prepared data_dir."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # `make test-fast` deselects these: subprocesses, whole training runs, full-size configs, HF peers.
    config.addinivalue_line("markers", "slow: runs a process, a training run or a full-size model (make test only)")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with every embedded dataset prepared once for the whole session."""
    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    os.environ["MASKJAX_DATA_DIR"] = path
    from maskjax.data import sources

    for builder in sources.EMBEDDED.values():
        builder(data_dir=path, file_format="array_record").download_and_prepare()
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
