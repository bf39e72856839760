"""A run's compiled programs, compiled ahead of its first step: the train state's creation, the
epoch (device input) and the test-set evaluation.

:func:`compile_run` is what :func:`energy_jax.train.train_and_evaluate` compiles before its first
epoch, and what ``benchmarks/reproduce.py`` compiles in a thread beforehand: built from the
config and the image counts alone (the data are shapes), so it can run while the data decode,
and a run in the same process calls these executables without tracing or compiling them again.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp

from energy_jax import inference, models, objectives, parallel
from energy_jax.data import sampling
from energy_jax.train.state import lower_create_train_state
from energy_jax.train.step import (device_data, device_epoch_fn, epoch_calls, fixed_length_calls,
                                   step_indices_spec)


class RunPrograms(NamedTuple):
  """The compiled programs of a run (``jax.stages.Compiled``): ``create_state(rng[,
  variables])``; ``epochs``, by call length, ``{steps: epoch(state, pools, in_idx, out_idx)}``
  (device input; empty for tf.data): one program where the steps run in a loop (every call, a
  shorter one padded: :func:`~energy_jax.train.step.fixed_length_calls`); unrolled (XLA:CPU),
  one when the calls of an epoch are of one length (:func:`~energy_jax.train.step.epoch_calls`),
  a second for a shorter last call;
  ``evaluate(variables, images)``: each batch of the test set (None: not compiled here)."""
  create_state: Any
  epochs: Dict[int, Any]
  evaluate: Optional[Any]


def _mesh(config, mesh):
  return mesh if mesh is not None else parallel.make_mesh(config.num_devices or None)


def _image_shape(config):
  size = int(config.image_size)
  return (size, size, 3)


def variable_shapes(config):
  """The model's ``{'params', 'batch_stats'}`` as ``jax.ShapeDtypeStruct`` (nothing computed)."""
  return jax.eval_shape(lambda: models.lazy_init_variables(
      models.from_config(config), jax.random.PRNGKey(0), _image_shape(config)))


def lower_create_state(config, total_steps: int):
  """The lowered state creation of a run: fresh, or around the pretrained variables."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return lower_create_train_state(config, key, total_steps,
                                  variable_shapes(config) if config.pretrained else None)


def call_lengths(config, num_train: int) -> List[int]:
  """The lengths of the compiled programs of a run's epochs (device input), longest first: the
  longest call's alone where one program runs every call (:func:`~energy_jax.train.step.
  fixed_length_calls`), else one per length of call."""
  steps = sampling.steps_per_epoch(num_train, config.batch_size, config.drop_remainder)
  lengths = sorted({c.stop - c.start for c in epoch_calls(steps, config.steps_per_call)},
                   reverse=True)
  return lengths[:1] if fixed_length_calls(config) else lengths


def lower_epoch(config, num_train: int, num_outliers: int, mesh=None, state_shapes=None,
                length: Optional[int] = None):
  """The lowered epoch program of a run on ``num_train`` images (and ``num_outliers``), device
  input, for calls of ``length`` steps (default: the longest, see :func:`call_lengths`).
  ``state_shapes``: the state's ``jax.ShapeDtypeStruct`` (default: those its creation gives)."""
  mesh = _mesh(config, mesh)
  steps = sampling.steps_per_epoch(num_train, config.batch_size, config.drop_remainder)
  padded = sampling.has_partial_batch(num_train, config.batch_size, config.drop_remainder)
  rep = parallel.replicated(mesh)
  if state_shapes is None:
    state_shapes = lower_create_state(config, steps * config.epochs).out_info
  uses_outliers = objectives.get(config.objective.name).uses_outliers
  pools = device_data(
      jax.ShapeDtypeStruct((num_train, *_image_shape(config)), jnp.uint8),
      jax.ShapeDtypeStruct((num_train,), jnp.int32),
      jax.ShapeDtypeStruct((num_outliers, *_image_shape(config)), jnp.uint8)
      if uses_outliers else None)
  length = length or call_lengths(config, num_train)[0]
  idx = jax.sharding.NamedSharding(mesh, step_indices_spec())
  out_batch = config.outlier_batch_size if uses_outliers else 0
  return device_epoch_fn(config, mesh, padded).lower(
      parallel.abstract(state_shapes, rep), parallel.abstract(pools, rep),
      jax.ShapeDtypeStruct((length, config.batch_size), jnp.int32, sharding=idx),
      jax.ShapeDtypeStruct((length, out_batch), jnp.int32, sharding=idx))


def lower_evaluation(config, num_test: int, mesh=None):
  """The lowered test-set evaluation of a run (``num_test`` images): the model's forward pass
  on one padded batch, the same program for both stages of a recipe (one model, one batch)."""
  return inference.lower_predict(models.from_config(config), variable_shapes(config),
                                 _image_shape(config), num_test, config.eval_batch_size,
                                 _mesh(config, mesh))


def compile_evaluation(config, num_test: int, mesh=None):
  """The compiled test-set evaluation of a run (see :func:`lower_evaluation`)."""
  return lower_evaluation(config, num_test, mesh).compile()


def compile_run(config, num_train: int, num_test: int, num_outliers: int, mesh=None,
                evaluation: bool = True) -> RunPrograms:
  """Compiles the programs :func:`~energy_jax.train.train_and_evaluate` runs for ``config``
  on these image counts (see :func:`energy_jax.data.count_run_data`): the state's creation, the
  epoch's calls (device input) and, with ``evaluation``, the test-set evaluation (else None: a
  run compiles it at its first evaluation, so that its first epoch need not wait for it).
  Programs already compiled in this process are reused, not compiled again. Margins given as
  "auto" are numbers only once the run computed them from its starting model: compiled ahead
  with "auto", the run's epoch is another program."""
  mesh = _mesh(config, mesh)
  steps = sampling.steps_per_epoch(num_train, config.batch_size, config.drop_remainder)
  create = lower_create_state(config, steps * config.epochs)
  epochs = {}
  if config.input_pipeline == "device":
    for length in call_lengths(config, num_train):
      epochs[length] = lower_epoch(config, num_train, num_outliers, mesh, create.out_info,
                                   length).compile()
  return RunPrograms(create.compile(), epochs,
                     compile_evaluation(config, num_test, mesh) if evaluation else None)
