"""maskjax: one trainer for masked pretraining (MAE, SimMIM, ...) in JAX/Flax."""
__version__ = "0.1.0"
