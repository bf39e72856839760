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


def cosine_schedule(base_lr: float, total_steps: int, lr_min: float = 1e-6) -> optax.Schedule:
  """``lr(k) = lr_min + (lr - lr_min) * (1 + cos(pi * (k + 1) / total)) / 2`` for update ``k``.

  The reference's ``LambdaLR(lambda s: cosine_annealing(s, total, 1, 1e-6 / lr))``: its factor
  ends at ``1e-6 / lr``, so the rate ends at ``lr_min = 1e-6`` absolute. ``k + 1``: the reference
  calls ``scheduler.step()`` before ``optimizer.step()``, so its first update already uses the
  step-1 rate.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")

  def schedule(count):
    # (1 + cos(pi f)) / 2 as sin^2(pi (1 - f) / 2), with 1 - f from integers: near the end of the
    # run 1 + cos(pi f) cancels to a few float32 ulps, sin of the small remaining angle does not.
    remaining = (total_steps - jnp.minimum(count + 1, total_steps)) / total_steps
    return lr_min + (base_lr - lr_min) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))
  return schedule


def make_optimizer(config, total_steps: int) -> Optimizer:
  """SGD with nesterov momentum and L2 weight decay on every parameter, cosine per step."""
  schedule = cosine_schedule(config.learning_rate, total_steps, config.min_learning_rate)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  return Optimizer(tx, schedule)
