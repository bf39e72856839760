"""The training state and its creation."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from energy_jax import models, optimizers

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue exactly: weights, BN statistics, optimiser state, step,
  rng; and, outside the saved arrays, the optimiser ``tx`` that updates them and the
  ``learning_rate`` schedule it follows (built once per run, as flax's ``TrainState.tx``)."""
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  learning_rate: optax.Schedule = flax.struct.field(pytree_node=False)

  @property
  def variables(self):
    """``{'params', 'batch_stats'}`` for ``model.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def hashable_config(config) -> ml_collections.FrozenConfigDict:
  """``config`` as a hashable, immutable value: a static argument or cache key of the compiled
  functions built from it (equal contents, equal keys)."""
  return ml_collections.FrozenConfigDict(config)


def create_train_state(config, rng: Array, total_steps: int,
                       variables: Optional[Mapping[str, Any]] = None) -> TrainState:
  """A fresh state (or one around ``variables``, e.g. pretrained weights) with the optimiser
  ``config.optimizer`` names over ``total_steps`` updates, built as one compiled program (op by
  op it would compile ~20 small ones)."""
  if variables is not None:
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  return _create_train_state_fn()(hashable_config(config),
                                  optimizers.from_config(config, total_steps), rng, variables)


def _create_train_state_fn():
  # Compiled as an initialisation (models.init_compiler_options): its random numbers dominate.
  return models.jit_for_init(_create_train_state, static_argnums=(0, 1))


def _create_train_state(config, optimizer: optimizers.Optimizer, rng: Array,
                        variables) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  if variables is None:
    variables = models.lazy_init_variables(models.from_config(config), init_rng,
                                           (config.image_size, config.image_size, 3))
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.tx.init(variables["params"]), rng=state_rng,
                    tx=optimizer.tx, learning_rate=optimizer.learning_rate)


def lower_create_train_state(config, rng, total_steps: int, variables=None):
  """The lowered program of :func:`create_train_state` (``rng`` and ``variables`` may be
  ``jax.ShapeDtypeStruct``): ``.compile()`` it ahead of the run, whose call then reuses it;
  ``.out_info`` holds the state's shapes."""
  return _create_train_state_fn().lower(hashable_config(config),
                                   optimizers.from_config(config, total_steps), rng, variables)
