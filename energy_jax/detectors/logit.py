"""Detectors that read the logits only."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from energy_jax.detectors.base import Detector, register
from energy_jax.ood import scores


@register("msp")
@dataclasses.dataclass(frozen=True)
class MSP(Detector):
  """Maximum softmax probability ``max_y softmax(f(x))_y`` (Hendrycks & Gimpel, ICLR 2017)."""

  def score(self, params, *, logits, **unused):
    return scores.msp_score(logits)


@register("max_logit")
@dataclasses.dataclass(frozen=True)
class MaxLogit(Detector):
  """Maximum logit ``max_y f_y(x)`` (Hendrycks et al., ICML 2022)."""

  def score(self, params, *, logits, **unused):
    return scores.max_logit_score(logits)


@register("energy")
@dataclasses.dataclass(frozen=True)
class Energy(Detector):
  """Negative free energy ``-E(x) = T * logsumexp(f(x) / T)`` (Liu et al., NeurIPS 2020)."""
  temperature: float = 1.0

  def score(self, params, *, logits, **unused):
    return scores.energy_score(logits, self.temperature)
