"""The optimiser of the reference: ``torch.optim.SGD(nesterov=True, momentum=0.9,
weight_decay=5e-4)`` under a per-step cosine ``LambdaLR`` (the decay is added to the gradient of
every parameter before momentum)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import optax


class Optimizer(NamedTuple):
  """The gradient transformation and the learning-rate schedule it follows (for logging)."""
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule


def cosine_schedule(base_lr: float, total_steps: int, min_lr_ratio: float = 1e-6) -> optax.Schedule:
  """``lr(k) = lr_min + (lr - lr_min) * (1 + cos(pi * (k + 1) / total)) / 2`` for update ``k``.

  ``k + 1``: the reference calls ``scheduler.step()`` before ``optimizer.step()``,
  so its first update already uses the step-1 rate.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  lr_min = base_lr * min_lr_ratio

  def schedule(count):
    frac = jnp.minimum(count + 1, total_steps) / total_steps
    return lr_min + (base_lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return schedule


def make_optimizer(config, total_steps: int) -> Optimizer:
  """SGD with nesterov momentum and L2 weight decay on every parameter, cosine per step."""
  schedule = cosine_schedule(config.learning_rate, total_steps, config.min_lr_ratio)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  return Optimizer(tx, schedule)
