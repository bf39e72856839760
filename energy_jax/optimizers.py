"""Optimisers by name (``config.optimizer.name``): optax gradient transformations with the fields
they read (``config.optimizer.FIELD``), all following the per-step cosine schedule.

* ``sgd`` (the default, the reference's ``torch.optim.SGD(nesterov=True, momentum=0.9,
  weight_decay=5e-4)``): ``g <- g + weight_decay * w`` on every parameter, then (Nesterov)
  momentum: ``v <- momentum * v + g``, ``w <- w - lr(k) * (g + momentum * v)``;
* ``adamw``: ``optax.adamw`` with the decoupled decay ``w <- w - lr(k) * weight_decay * w``.

Every optimiser reads ``learning_rate``, ``min_learning_rate`` (the schedule,
:func:`cosine_schedule`) and ``weight_decay``. A new optimiser is one file:
``@register("name", fields=(Field(...), ...))`` on ``build(learning_rate, *, weight_decay,
**fields) -> optax.GradientTransformation`` (``learning_rate``: the schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Dict, NamedTuple, Sequence, Tuple

import jax.numpy as jnp
import ml_collections
import optax

from energy_jax.fields import Field, boolean, real, union
from energy_jax.registry import Registry


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


# The fields every optimiser reads.
SCHEDULE_FIELDS = (
    Field("learning_rate", 0.1, "peak learning rate of the per-step cosine schedule",
          real(0.0, low_open=True)),
    Field("min_learning_rate", 1e-6, "the cosine ends at this rate (absolute, as the "
          "reference's LambdaLR floor 1e-6 / learning_rate)", real(0.0)),
    Field("weight_decay", 5e-4, "weight decay of every parameter (sgd: added to the gradient "
          "before momentum, as the reference; adamw: decoupled)", real(0.0)),
)


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
  """A registered optimiser: ``build(learning_rate, *, weight_decay, **fields)`` and its own
  fields."""
  build: Callable[..., optax.GradientTransformation]
  fields: Tuple[Field, ...] = ()


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")


def register(name: str, *, fields: Sequence[Field] = (), replace: bool = False):
  """Decorator registering an optimiser (see the module docstring); a field another optimiser
  declares too must have its default."""
  def add(build):
    others = [get(n).fields for n in names() if n != name]
    union([SCHEDULE_FIELDS, *others, fields], "optimizer")
    OPTIMIZERS.register(name, replace=replace)(OptimizerEntry(build, tuple(fields)))
    return build
  return add


def get(name: str) -> OptimizerEntry:
  """The registered optimiser ``name``."""
  return OPTIMIZERS.get(name)


def names() -> Tuple[str, ...]:
  """The registered optimiser names."""
  return OPTIMIZERS.names()


def fields() -> Dict[str, Field]:
  """The schedule's fields and those of every registered optimiser, by name (the config holds
  them all, so that ``--config.optimizer.name`` can switch among them)."""
  return union([SCHEDULE_FIELDS, *(get(n).fields for n in names())], "optimizer")


def check(section) -> None:
  """Raises for values of ``config.optimizer`` that must agree."""
  if section.min_learning_rate > section.learning_rate:
    raise ValueError(f"config.optimizer.min_learning_rate = {section.min_learning_rate} must not "
                     f"exceed config.optimizer.learning_rate = {section.learning_rate} (the "
                     "cosine schedule falls from the one to the other)")


def from_config(config, total_steps: int) -> Optimizer:
  """The optimiser ``config.optimizer`` names over ``total_steps`` updates. One object per
  distinct section and length: a train state carrying it keeps its compiled programs."""
  return _build(ml_collections.FrozenConfigDict(config.optimizer), total_steps)


@functools.lru_cache(maxsize=None)
def _build(section, total_steps: int) -> Optimizer:
  return build(section, total_steps)


def build(section, total_steps: int) -> Optimizer:
  """The optimiser ``section`` (``config.optimizer``, or anything read as it) names over
  ``total_steps`` updates, uncached: its numbers may be traced arrays (a sweep's members)."""
  entry = get(section.name)
  schedule = cosine_schedule(section.learning_rate, total_steps, section.min_learning_rate)
  own = {k: section[k] for k in inspect.signature(entry.build).parameters
         if k not in ("learning_rate",) and k in section}
  return Optimizer(entry.build(schedule, **own), schedule)


@register("sgd", fields=(
    Field("momentum", 0.9, "sgd: momentum", real(0.0, 1.0, high_open=True)),
    Field("nesterov", True, "sgd: Nesterov momentum, as torch.optim.SGD(nesterov=True)", boolean)))
def sgd(learning_rate, *, weight_decay, momentum, nesterov):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


@register("adamw", fields=(
    Field("b1", 0.9, "adamw: decay of the first moment", real(0.0, 1.0, high_open=True)),
    Field("b2", 0.999, "adamw: decay of the second moment", real(0.0, 1.0, high_open=True)),
    Field("eps", 1e-8, "adamw: added to the root of the second moment", real(0.0,
                                                                             low_open=True))))
def adamw(learning_rate, *, weight_decay, b1, b2, eps):
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
