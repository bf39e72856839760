"""Detectors that reshape the penultimate activations before the classifier head, then score the
energy of the new logits (ReAct, ASH-P/-B/-S, DICE, SCALE), and GradNorm.

All read ``features [N, D]`` and the head ``(W [D, C], b [C])`` (``logits = features @ W + b``,
:func:`energy_jax.models.head`). Percentiles are traced: a grid over them compiles once. Matrix
products here run at full float32 precision (on GPUs the default may use TF32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.detectors import scores
from energy_jax.detectors.base import (Detector, check_feature_size, check_range, head_params,
                                       hparam, register)

HIGHEST = jax.lax.Precision.HIGHEST


def head_logits(features, params, weight=None):
  """``features @ W + b`` with the fitted head (or another ``weight`` of its shape)."""
  w = params["weight"] if weight is None else weight
  return jnp.matmul(features.astype(jnp.float32), w, precision=HIGHEST) + params["bias"]


def logsumexp_energy(logits):
  """``logsumexp(logits)``: the negative free energy at T=1, the score all of these report."""
  return jax.nn.logsumexp(logits, axis=-1)


def top_fraction_mask(features, percentile):
  """Per row, the ``k = D - round(D * percentile / 100)`` largest activations (at least 1), as a
  boolean mask and ``k``; ties go to the lower index (``torch.topk``, which ASH uses, leaves
  them unspecified)."""
  d = features.shape[-1]
  k = jnp.maximum(d - jnp.round(d * percentile / 100.0), 1.0)
  order = jnp.argsort(-features, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return rank < k, k


class _HeadDetector(Detector):
  """A detector fitted on the classifier head alone."""
  needs = frozenset({"features"})
  fit_needs = frozenset({"head"})

  def fit_params(self, *, head, **unused):
    return head_params(head)

  def check(self, params, inputs):
    check_feature_size(params, inputs)


def _check_percentile(name, value):
  check_range(name, value, 0.0, 100.0, high_open=True)


@register("react")
@dataclasses.dataclass(frozen=True)
class ReAct(_HeadDetector):
  """ReAct + energy: activations clipped at the ``percentile``-th percentile ``c`` of the training
  set's activations, ``logsumexp((min(z, c)) @ W + b)``.

  Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS 2021.
  OpenOOD v1.5: percentile 90, sweep [85, 90, 95, 99] (it takes ``c`` on ID validation
  features; here on the training features).
  """
  percentile: float = hparam(90.0)
  fit_needs = frozenset({"train_features", "head"})
  grid = {"percentile": (85.0, 90.0, 95.0, 99.0)}

  def check_hparams(self):
    _check_percentile("percentile", self.percentile)

  def fit_params(self, *, train_features, head, **unused):
    threshold = np.percentile(np.asarray(train_features, np.float32).ravel(), self.percentile)
    return {**head_params(head), "threshold": jnp.asarray(threshold, jnp.float32)}

  def compute(self, params, hp, *, features, **unused):
    clipped = jnp.minimum(features.astype(jnp.float32), params["threshold"])
    return logsumexp_energy(head_logits(clipped, params))


_ASH_GRID = {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)}


@register("ash_p")
@dataclasses.dataclass(frozen=True)
class ASHP(_HeadDetector):
  """ASH-P + energy: per example, activations below the top ``k = D - round(D p / 100)`` are
  zeroed, ``logsumexp((z * keep) @ W + b)``.

  Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
  ICLR 2023. OpenOOD v1.5: percentile 90, sweep [65 ... 95]; applied to the pooled penultimate
  features, as OpenOOD does.
  """
  percentile: float = hparam(90.0)
  grid = _ASH_GRID

  def check_hparams(self):
    _check_percentile("percentile", self.percentile)

  def compute(self, params, hp, *, features, **unused):
    z = features.astype(jnp.float32)
    keep, _ = top_fraction_mask(z, hp["percentile"])
    return logsumexp_energy(head_logits(jnp.where(keep, z, 0.0), params))


@register("ash_b")
@dataclasses.dataclass(frozen=True)
class ASHB(ASHP):
  """ASH-B + energy: the kept top-``k`` activations all become ``s1 / k`` (``s1 = sum_d z_d``,
  before pruning), the rest 0.

  Djurisic et al., ICLR 2023 (see ``ash_p``).
  """

  def compute(self, params, hp, *, features, **unused):
    z = features.astype(jnp.float32)
    keep, k = top_fraction_mask(z, hp["percentile"])
    fill = jnp.sum(z, axis=-1, keepdims=True) / k
    return logsumexp_energy(head_logits(jnp.where(keep, fill, 0.0), params))


def _sharpening(z, keep):
  """``s1 / s2``: the activations' sum over their sum after pruning (0 where that is 0, so that a
  row with no positive activation keeps its scale)."""
  s1 = jnp.sum(z, axis=-1, keepdims=True)
  s2 = jnp.sum(jnp.where(keep, z, 0.0), axis=-1, keepdims=True)
  return jnp.where(s2 != 0, s1 / jnp.where(s2 != 0, s2, 1.0), 0.0)


@register("ash_s")
@dataclasses.dataclass(frozen=True)
class ASHS(ASHP):
  """ASH-S + energy: pruned as ASH-P, then scaled by ``exp(s1 / s2)`` (``s1``, ``s2``: the sums
  before and after pruning).

  Djurisic et al., ICLR 2023 (see ``ash_p``).
  """

  def compute(self, params, hp, *, features, **unused):
    z = features.astype(jnp.float32)
    keep, _ = top_fraction_mask(z, hp["percentile"])
    shaped = jnp.where(keep, z, 0.0) * jnp.exp(_sharpening(z, keep))
    return logsumexp_energy(head_logits(shaped, params))


@register("scale")
@dataclasses.dataclass(frozen=True)
class SCALE(ASHP):
  """SCALE + energy: the unpruned activations scaled by ASH-S's ``exp(s1 / s2)``.

  Xu et al., "Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
  ICLR 2024. OpenOOD v1.5: percentile 85, sweep [65 ... 95].
  """
  percentile: float = hparam(85.0)

  def compute(self, params, hp, *, features, **unused):
    z = features.astype(jnp.float32)
    keep, _ = top_fraction_mask(z, hp["percentile"])
    return logsumexp_energy(head_logits(z * jnp.exp(_sharpening(z, keep)), params))


@register("dice")
@dataclasses.dataclass(frozen=True)
class DICE(_HeadDetector):
  """DICE + energy: only the head's weights with the largest contributions ``V = mean_train(z)
  [:, None] * W`` (those above the ``sparsity``-th percentile of ``V``) are kept,
  ``logsumexp(z @ (W * [V > percentile(V, p)]) + b)``.

  Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
  OpenOOD v1.5: p 90, sweep [90].
  """
  sparsity: float = hparam(90.0)
  fit_needs = frozenset({"train_features", "head"})
  grid = {"sparsity": (90.0,)}

  def check_hparams(self):
    _check_percentile("sparsity", self.sparsity)

  def fit_params(self, *, train_features, head, **unused):
    mean = np.asarray(train_features, np.float64).mean(0)
    return {**head_params(head), "mean_features": jnp.asarray(mean, jnp.float32)}

  def compute(self, params, hp, *, features, **unused):
    contribution = params["mean_features"][:, None] * params["weight"]
    threshold = jnp.percentile(contribution, hp["sparsity"])
    masked = jnp.where(contribution > threshold, params["weight"], 0.0)
    return logsumexp_energy(head_logits(features, params, masked))


@register("gradnorm")
@dataclasses.dataclass(frozen=True)
class GradNorm(Detector):
  """GradNorm: the L1 norm of the head weights' gradient of ``sum_c -log softmax(f(x) / T)_c``
  (the cross-entropy against all-ones targets, ``C`` times the KL to the uniform distribution),
  in closed form ``||dL/dW||_1 = ||z||_1 * sum_c |C p_c - 1| / T`` with ``p = softmax(f / T)``.

  Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
  Wild", NeurIPS 2021 (T=1 as there and in OpenOOD v1.5, which has no sweep).
  """
  temperature: float = hparam(1.0)
  needs = frozenset({"logits", "features"})

  def check_hparams(self):
    scores.check_temperature(self.temperature)

  def compute(self, params, hp, *, logits, features, **unused):
    t = hp["temperature"]
    p = jax.nn.softmax(logits.astype(jnp.float32) / t, axis=-1)
    num_classes = logits.shape[-1]
    return (jnp.sum(jnp.abs(features.astype(jnp.float32)), axis=-1)
            * jnp.sum(jnp.abs(num_classes * p - 1.0), axis=-1) / t)
