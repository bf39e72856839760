"""Detectors that read the logits only: MSP, MaxLogit, Energy, GEN, KL-Matching.

MSP, MaxLogit and Energy give NaN for a row of non-finite logits (:mod:`energy_jax.detectors.scores`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.detectors.base import Detector, check_range, hparam, register
from energy_jax.detectors import scores


@register("msp")
@dataclasses.dataclass(frozen=True)
class MSP(Detector):
  """Maximum softmax probability ``max_y softmax(f(x))_y``.

  Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
  in Neural Networks", ICLR 2017.
  """

  def compute(self, params, hp, *, logits, **unused):
    return scores.msp_score(logits)


@register("max_logit")
@dataclasses.dataclass(frozen=True)
class MaxLogit(Detector):
  """Maximum logit ``max_y f_y(x)``.

  Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
  """

  def compute(self, params, hp, *, logits, **unused):
    return scores.max_logit_score(logits)


@register("energy")
@dataclasses.dataclass(frozen=True)
class Energy(Detector):
  """Negative free energy ``-E(x) = T * logsumexp(f(x) / T)``.

  Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, Eq. (7).
  Default T=1 (the paper's and OpenOOD's, whose sweep is ``[1]``); the reference tunes nothing.
  """
  temperature: float = hparam(1.0)
  grid = {"temperature": (1.0,)}
  reference_grid = {}

  def check_hparams(self):
    scores.check_temperature(self.temperature)

  def compute(self, params, hp, *, logits, **unused):
    return scores.energy_score(logits, hp["temperature"])


@register("gen")
@dataclasses.dataclass(frozen=True)
class GEN(Detector):
  """Generalised entropy of the ``M`` largest softmax probabilities,
  ``-sum_{j <= M} p_(j)^gamma (1 - p_(j))^gamma`` (``p_(1) >= p_(2) >= ...``).

  Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
  Detection", CVPR 2023, Eq. (6). OpenOOD v1.5 defaults: gamma 0.1, M 100 (with fewer classes
  than M, all classes count). Both are traced: the top-M is a mask on the sorted probabilities.
  Computed in log space, so that tiny probabilities and ``1 - p`` of a near-certain class keep
  their value in float32 (a direct float32 product, as OpenOOD's, loses both).
  """
  gamma: float = hparam(0.1)
  top_classes: int = hparam(100)
  grid = {"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0), "top_classes": (10, 50, 100, 200, 500,
                                                                          1000)}

  def check_hparams(self):
    check_range("gamma", self.gamma, 0.0, np.inf, low_open=True, high_open=True)
    if int(self.top_classes) != self.top_classes or self.top_classes < 1:
      raise ValueError(f"top_classes (M) must be a positive integer, got {self.top_classes!r}")

  def compute(self, params, hp, *, logits, **unused):
    logits = logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_1mp = _log_one_minus_softmax(logits, log_p)
    # p^g (1-p)^g in log space: a probability that underflows, or one so close to 1 that 1 - p
    # rounds to 0 in float32, still counts as the formula says.
    terms = jnp.exp(hp["gamma"] * (log_p + log_1mp))
    order = jnp.argsort(-log_p, axis=-1)
    ranked = jnp.take_along_axis(terms, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    return -jnp.sum(jnp.where(rank < hp["top_classes"], ranked, 0.0), axis=-1)


def _log_one_minus_softmax(logits, log_p):
  """``log(1 - softmax(logits))`` without cancellation: ``log1p(-p)`` below 1/2 and, for the one
  class that may be above (the top), the log of the other classes' total probability."""
  top = jnp.argmax(logits, axis=-1)
  is_top = jnp.arange(logits.shape[-1]) == top[..., None]
  others = jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, logits), axis=-1, keepdims=True)
  log_others = others - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  small = jnp.log1p(-jnp.exp(jnp.minimum(log_p, np.log(0.5))))
  return jnp.where(is_top & (log_p > np.log(0.5)), log_others, small)


@register("klm")
@dataclasses.dataclass(frozen=True)
class KLMatching(Detector):
  """KL matching: ``-min_k KL(p(x) || d_k)`` where ``d_k`` is the mean softmax of the training
  examples predicted as class ``k`` (a one-hot at ``k`` if none is).

  Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022
  (OpenOOD v1.5's ``klm``, which takes the means on ID validation data; here on the training
  set).
  """
  fit_needs = frozenset({"train_logits"})

  def fit_params(self, *, train_logits, **unused):
    logits = np.asarray(train_logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pred = logits.argmax(-1)
    num_classes = logits.shape[1]
    means = np.eye(num_classes)
    for k in np.unique(pred):
      means[k] = p[pred == k].mean(0)
    return {"class_softmax": jnp.asarray(means, jnp.float32)}

  def check(self, params, inputs):
    c_fit, c = np.shape(params["class_softmax"])[0], np.shape(inputs["logits"])[1]
    if c != c_fit:
      raise ValueError(f"logits have {c} classes, the detector was fitted on {c_fit}")

  def compute(self, params, hp, *, logits, **unused):
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    log_d = jnp.log(params["class_softmax"])                                   # [K, C]
    # KL(p || d_k) = sum_c p_c (log p_c - log d_kc); a p_c that underflows to 0 adds 0.
    terms = jnp.where(p[:, None, :] > 0, p[:, None, :] * (log_p[:, None, :] - log_d[None]), 0.0)
    return -jnp.min(jnp.sum(terms, axis=-1), axis=-1)
