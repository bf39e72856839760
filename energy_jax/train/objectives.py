"""Training objectives by name (``config.objective``), on the logits of one forward pass over
``[in-distribution; outliers]``.

* ``ce``: cross-entropy on the in-distribution images (pretraining);
* ``energy``: ``CE + energy_weight * (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``
  (Liu et al., NeurIPS 2020, Eq. 9; weight 0.1);
* ``oe``: ``CE + oe_weight * mean(logsumexp f(x_out) - mean f(x_out))`` (Hendrycks et al.,
  ICLR 2019; weight 0.5).

A new objective is ``@register("name", uses_outliers=...)`` on
``fn(config, *, logits_in, logits_out, labels) -> (loss, metrics)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from energy_jax import losses
from energy_jax.ood import scores
from energy_jax.registry import Registry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective: its loss function and whether it reads an outlier batch."""
  loss: Callable[..., Tuple[Array, Dict[str, Array]]]
  uses_outliers: bool


OBJECTIVES: Registry[Objective] = Registry("objective")


def register(name: str, *, uses_outliers: bool, replace: bool = False):
  """Decorator registering ``fn(config, *, logits_in, logits_out, labels) -> (loss, metrics)``."""
  def add(fn):
    OBJECTIVES.register(name, replace=replace)(Objective(fn, uses_outliers))
    return fn
  return add


def get(name: str) -> Objective:
  """The registered objective ``name``."""
  return OBJECTIVES.get(name)


def names():
  """The registered objective names."""
  return OBJECTIVES.names()


def _mean_ce(logits_in, labels):
  return jnp.mean(losses.softmax_cross_entropy(logits=logits_in, labels=labels))


@register("ce", uses_outliers=False)
def cross_entropy(config, *, logits_in, logits_out, labels):
  ce = _mean_ce(logits_in, labels)
  return ce, {"ce": ce}


@register("energy", uses_outliers=True)
def energy_bounded(config, *, logits_in, logits_out, labels):
  ce = _mean_ce(logits_in, labels)
  reg = losses.energy_bounded_loss(logits_in=logits_in, logits_out=logits_out,
                                   m_in=config.m_in, m_out=config.m_out)
  return ce + config.energy_weight * reg, {
      "ce": ce, "energy_reg": reg, "energy_in": jnp.mean(scores.free_energy(logits_in)),
      "energy_out": jnp.mean(scores.free_energy(logits_out))}


@register("oe", uses_outliers=True)
def outlier_exposure(config, *, logits_in, logits_out, labels):
  ce = _mean_ce(logits_in, labels)
  reg = losses.outlier_exposure_loss(logits_out=logits_out)
  return ce + config.oe_weight * reg, {"ce": ce, "oe_reg": reg}


def objective_loss(config, logits: Array, labels: Array, num_in: int):
  """``(loss, metrics)`` of ``config.objective`` on the logits of ``[in; out]`` images; metrics
  add ``loss`` and the in-distribution ``accuracy``."""
  logits_in, logits_out = logits[:num_in], logits[num_in:]
  loss, metrics = get(config.objective).loss(config, logits_in=logits_in, logits_out=logits_out,
                                             labels=labels)
  metrics["loss"] = loss
  metrics["accuracy"] = jnp.mean(jnp.argmax(logits_in, -1) == labels)
  return loss, metrics
