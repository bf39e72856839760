"""Training objectives by name (``config.objective``), on the logits of one forward pass over
``[in-distribution; outliers]``.

* ``ce``: cross-entropy on the in-distribution images (pretraining);
* ``energy``: ``CE + energy_weight * (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``
  (Liu et al., NeurIPS 2020, Eq. 9; weight 0.1);
* ``oe``: ``CE + oe_weight * mean(logsumexp f(x_out) - mean f(x_out))`` (Hendrycks et al.,
  ICLR 2019; weight 0.5).

Means run over the real examples of the global batch: ``mean_in`` / ``mean_out`` return this
device's share (its masked sum over the global count), which the step sums over the devices.

A new objective is ``@register("name", uses_outliers=...)`` on
``fn(config, *, logits_in, logits_out, labels, mean_in, mean_out) -> (loss, metrics)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

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
  """Decorator registering ``fn(config, *, logits_in, logits_out, labels, mean_in, mean_out)
  -> (loss, metrics)``."""
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


@register("ce", uses_outliers=False)
def cross_entropy(config, *, logits_in, logits_out, labels, mean_in, mean_out):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  return ce, {"ce": ce}


@register("energy", uses_outliers=True)
def energy_bounded(config, *, logits_in, logits_out, labels, mean_in, mean_out):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  reg = (mean_in(losses.energy_hinge_in(logits=logits_in, m_in=config.m_in))
         + mean_out(losses.energy_hinge_out(logits=logits_out, m_out=config.m_out)))
  return ce + config.energy_weight * reg, {
      "ce": ce, "energy_reg": reg, "energy_in": mean_in(scores.free_energy(logits_in)),
      "energy_out": mean_out(scores.free_energy(logits_out))}


@register("oe", uses_outliers=True)
def outlier_exposure(config, *, logits_in, logits_out, labels, mean_in, mean_out):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  reg = mean_out(losses.outlier_exposure_per_example(logits=logits_out))
  return ce + config.oe_weight * reg, {"ce": ce, "oe_reg": reg}


def share_of_mean(mask: Optional[Array], n: int, axis_name: Optional[str]):
  """``mean(x)``: this device's share of the mean of per-example ``x [n]`` over the real examples
  (``mask``) of all devices, ``sum_local(x * mask) / count_global``."""
  if mask is None:
    count = n * (lax.psum(1, axis_name) if axis_name is not None else 1)
    return lambda x: jnp.sum(x) / count
  weights = mask.astype(jnp.float32)
  count = jnp.sum(weights)
  if axis_name is not None:
    count = lax.psum(count, axis_name)
  count = jnp.maximum(count, 1.0)
  return lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / count


def objective_loss(config, logits: Array, labels: Array, num_in: int,
                   mask_in: Optional[Array] = None, axis_name: Optional[str] = None):
  """``(loss, metrics)`` of ``config.objective`` on the logits of ``[in; out]`` images, as this
  device's share (summed over ``axis_name``, they are the global batch's); metrics add ``loss``
  and the in-distribution ``accuracy``. ``mask_in``: the real in-distribution examples."""
  logits_in, logits_out = logits[:num_in], logits[num_in:]
  mean_in = share_of_mean(mask_in, num_in, axis_name)
  mean_out = share_of_mean(None, logits_out.shape[0], axis_name)
  loss, metrics = get(config.objective).loss(
      config, logits_in=logits_in, logits_out=logits_out, labels=labels, mean_in=mean_in,
      mean_out=mean_out)
  metrics["loss"] = loss
  metrics["accuracy"] = mean_in((jnp.argmax(logits_in, -1) == labels).astype(jnp.float32))
  return loss, metrics
