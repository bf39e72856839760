"""Detectors that perturb the input along a gradient before scoring: ODIN and Mahalanobis with
input pre-processing (both as the reference, ``utils/score_calculation.py``)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from energy_jax.detectors.base import Detector, register
from energy_jax.ood import scores


@functools.lru_cache(maxsize=None)
def _logits_fn(apply_fn):
  return lambda variables, x: apply_fn(variables, x).logits


@functools.lru_cache(maxsize=None)
def _features_fn(apply_fn):
  return lambda variables, x: apply_fn(variables, x).features


@register("odin")
@dataclasses.dataclass(frozen=True)
class ODIN(Detector):
  """ODIN (Liang et al., ICLR 2018): temperature-scaled MSP after a small input perturbation
  ``x' = x - epsilon * sign(-grad_x log S_yhat(x; T)) / std``."""
  temperature: float = 1000.0
  epsilon: float = 0.0014
  needs = frozenset({"images"})
  grid = {"temperature": (1.0, 10.0, 100.0, 1000.0), "epsilon": (0.0, 0.0005, 0.0014, 0.004)}

  def score(self, params, *, images, model, **unused):
    apply_fn, variables = model
    return scores.odin_score(_logits_fn(apply_fn), variables, images,
                             temperature=self.temperature, epsilon=self.epsilon)


@register("mahalanobis")
@dataclasses.dataclass(frozen=True)
class Mahalanobis(Detector):
  """Mahalanobis distance to the closest class mean under one shared covariance, on the
  penultimate features, after input pre-processing of size ``epsilon`` (Lee et al., NeurIPS
  2018, as the reference applies it: last layer only)."""
  epsilon: float = 0.0014
  needs = frozenset({"images"})
  fit_needs = frozenset({"train_features", "train_labels", "head"})
  grid = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005)}

  def fit(self, *, train_features, train_labels, head=None, **unused):
    labels = np.asarray(train_labels)
    num_classes = int(np.shape(head[0])[-1]) if head is not None else int(labels.max()) + 1
    return scores.fit_mahalanobis(train_features, labels, num_classes)

  def score(self, params, *, images, model, **unused):
    apply_fn, variables = model
    return scores.mahalanobis_score(_features_fn(apply_fn), variables, images, params,
                                    epsilon=self.epsilon)
