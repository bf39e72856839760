"""Training objectives by name (``config.objective.name``), each with the fields it reads
(``config.objective.FIELD``), on the outputs of one forward pass over ``[in-distribution;
outliers]``.

* ``ce``: cross-entropy on the in-distribution images (pretraining);
* ``energy``: ``CE + energy_weight * (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``
  with ``E(x) = -logsumexp f(x)`` (Liu et al., NeurIPS 2020, Eq. 9; weight 0.1);
* ``oe``: ``CE + oe_weight * mean(logsumexp f(x_out) - mean f(x_out))`` (Hendrycks et al.,
  ICLR 2019; weight 0.5).

An objective is ``fn(fields, *, logits_in, logits_out, features_in, features_out, labels,
mean_in, mean_out) -> (loss, metrics)``: ``fields`` is ``config.objective``; ``features_*`` are
the penultimate features of the same forward pass (:class:`energy_jax.models.ModelOutput`);
``mean_in`` / ``mean_out`` average per-example values over the real examples of the global batch
(each device returns its share, which the step sums over the devices). A new objective is one
file: ``@register("name", uses_outliers=..., fields=(Field(...), ...))`` on its function; its
fields join ``config.objective`` with their defaults, ``--help`` lines and checks.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from energy_jax import losses
from energy_jax.fields import Field, fail, real, string, union
from energy_jax.registry import Registry

Array = jax.Array

# The margins a run may compute from the pretrained model (energy_jax.train.margins).
AUTO = "auto"
AUTO_FIELDS = ("m_in", "m_out")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective: its loss, whether it reads an outlier batch, the fields it declares
  and ``check(fields)``, raising for values that must agree (run when it is the chosen one)."""
  loss: Callable[..., Tuple[Array, Dict[str, Array]]]
  uses_outliers: bool
  fields: Tuple[Field, ...] = ()
  check: Optional[Callable[[Any], None]] = None


OBJECTIVES: Registry[Objective] = Registry("objective")


def register(name: str, *, uses_outliers: bool, fields: Sequence[Field] = (),
             check: Optional[Callable[[Any], None]] = None, replace: bool = False):
  """Decorator registering an objective (see the module docstring); a field another objective
  declares too must have its default."""
  def add(fn):
    others = [get(n).fields for n in names() if n != name]
    union([*others, fields], "objective")
    OBJECTIVES.register(name, replace=replace)(Objective(fn, uses_outliers, tuple(fields), check))
    return fn
  return add


def get(name: str) -> Objective:
  """The registered objective ``name``."""
  return OBJECTIVES.get(name)


def names() -> Tuple[str, ...]:
  """The registered objective names."""
  return OBJECTIVES.names()


def fields() -> Dict[str, Field]:
  """The fields of every registered objective, by name (the config holds them all, so that
  ``--config.objective.name`` can switch among them)."""
  return union((get(n).fields for n in names()), "objective")


def margin(name: str, value: Any) -> None:
  """A finite number, or "auto"."""
  if isinstance(value, str) and value == AUTO:
    return
  if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
    fail(name, value, f"a number or {AUTO!r}")
  real()(name, value)


def _auto_margins(name: str, value: Any) -> None:
  """'' or some of AUTO_FIELDS, comma-separated."""
  string()(name, value)
  if any(f.strip() not in AUTO_FIELDS for f in value.split(",") if f.strip()):
    fail(name, value, f"'' or some of {', '.join(AUTO_FIELDS)}, comma-separated")


def _margins_in_order(fields) -> None:
  if AUTO not in (fields.m_in, fields.m_out) and not fields.m_in < fields.m_out:
    raise ValueError(f"config.objective.m_in = {fields.m_in} must lie below "
                     f"config.objective.m_out = {fields.m_out}: the energy objective pushes "
                     "in-distribution energies below m_in and outlier energies above m_out")


@register("ce", uses_outliers=False)
def cross_entropy(fields, *, logits_in, labels, mean_in, **unused):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  return ce, {"ce": ce}


@register("energy", uses_outliers=True, check=_margins_in_order, fields=(
    Field("m_in", -23.0, "energy: in-distribution energies are pushed below m_in ('auto': from the "
          "pretrained model's energies, energy_jax.train.margins)", margin, any_type=True),
    Field("m_out", -5.0, "energy: outlier energies are pushed above m_out ('auto': as m_in)",
          margin, any_type=True),
    Field("auto_margins", "", "energy: which of m_in, m_out the run computed from 'auto' "
          "(comma-separated; the run fills it in and saves the numbers it computed)",
          _auto_margins),
    Field("energy_weight", 0.1, "energy: weight of the energy-bounded term", real(0.0))))
def energy_bounded(fields, *, logits_in, logits_out, labels, mean_in, mean_out, **unused):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  reg = (mean_in(losses.energy_hinge_in(logits=logits_in, m_in=fields.m_in))
         + mean_out(losses.energy_hinge_out(logits=logits_out, m_out=fields.m_out)))
  return ce + fields.energy_weight * reg, {
      "ce": ce, "energy_reg": reg, "energy_in": mean_in(losses.free_energy(logits_in)),
      "energy_out": mean_out(losses.free_energy(logits_out))}


@register("oe", uses_outliers=True, fields=(
    Field("oe_weight", 0.5, "oe: weight of the Outlier Exposure term", real(0.0)),))
def outlier_exposure(fields, *, logits_in, logits_out, labels, mean_in, mean_out, **unused):
  ce = mean_in(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  reg = mean_out(losses.outlier_exposure_per_example(logits=logits_out))
  return ce + fields.oe_weight * reg, {"ce": ce, "oe_reg": reg}
