"""maskjax: one trainer for masked pretraining (MAE, SimMIM, ...) in JAX/Flax.

Modules import only downwards (``tests/test_architecture.py`` fails on any cycle):

  errors                                   one base error and its exit status
  config                                   schema, load, override (no device or objective knowledge)
  sharding, masking, faults, metrics, ...  meshes and logical axes, pure mask functions, fault hooks
  models, data                             layers and encoders; TFDS sources, tokenizers, pipelines
  objectives                               one file per method behind ``objectives.base.Objective``
  step                                     validation, the sharded train state, the jitted step
  train, evaluate, bench, aot, export      the loop and the programs around it
  cli, sweep                               the command line
"""
__version__ = "0.1.0"
