"""The training state and its creation."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from energy_jax import models
from energy_jax.train.optim import make_optimizer

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue exactly: weights, BN statistics, optimiser, step, rng."""
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: Array

  @property
  def variables(self):
    """``{'params', 'batch_stats'}`` for ``model.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def frozen(config) -> ml_collections.FrozenConfigDict:
  """``config`` as a hashable, immutable value: a static argument or cache key of the compiled
  functions built from it (equal contents, equal keys)."""
  return ml_collections.FrozenConfigDict(config)


def create_train_state(config, rng: Array, total_steps: int,
                       variables: Optional[Mapping[str, Any]] = None) -> TrainState:
  """A fresh state (or one around ``variables``, e.g. pretrained weights) with a new optimiser,
  built as one compiled program (op by op it would compile ~20 small ones)."""
  if variables is not None:
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  return _create_train_state(frozen(config), rng, total_steps, variables)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _create_train_state(config, rng: Array, total_steps: int, variables) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  if variables is None:
    variables = models.init_variables(models.from_config(config), init_rng,
                                      (config.image_size, config.image_size, 3))
  tx = make_optimizer(config, total_steps).tx
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    rng=state_rng)


def lower_create_train_state(config, rng, total_steps: int, variables=None):
  """The lowered program of :func:`create_train_state` (``rng`` and ``variables`` may be
  ``jax.ShapeDtypeStruct``): ``.compile()`` it ahead of the run, whose call then reuses it;
  ``.out_info`` holds the state's shapes."""
  return _create_train_state.lower(frozen(config), rng, total_steps, variables)
