"""Detectors that perturb the input along a gradient before scoring: ODIN, Mahalanobis with input
pre-processing (last layer, as the reference's ``utils/score_calculation.py``) and Lee et al.'s
multi-layer Mahalanobis ensemble. They take ``images`` and ``model=(apply_fn, variables)``;
temperature and noise are traced, so a validation grid compiles once per batch shape."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.batching import map_batches
from energy_jax.detectors import logistic, scores
from energy_jax.detectors.base import Detector, hparam, register
from energy_jax.detectors.gaussians import as_mahalanobis_params, fit_class_gaussians

# Images per batch when ``fit`` scores the validation sets.
FIT_BATCH_SIZE = 250


@functools.lru_cache(maxsize=None)
def _logits_fn(apply_fn):
  return lambda variables, x: apply_fn(variables, x).logits


@functools.lru_cache(maxsize=None)
def _block_fn(apply_fn, index: int):
  return lambda variables, x: apply_fn(variables, x).blocks[index]


@functools.lru_cache(maxsize=None)
def _features_fn(apply_fn):
  return lambda variables, x: apply_fn(variables, x).features


def _num_classes(head, labels) -> int:
  return int(np.shape(head[0])[-1]) if head is not None else int(np.max(labels)) + 1


@register("odin")
@dataclasses.dataclass(frozen=True)
class ODIN(Detector):
  """ODIN: temperature-scaled MSP after a small input perturbation
  ``x' = x - epsilon * sign(-grad_x log S_yhat(x; T)) / std``.

  Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in Neural
  Networks", ICLR 2018. Defaults T=1000, eps=0.0014 (OpenOOD v1.5; its sweep T [1, 10, 100, 1000]
  x eps [0.0014, 0.0028]); the reference's ``run.sh`` sweeps T [1, 10, 100, 1000] x eps
  [0, 0.0004, ..., 0.0048].
  """
  temperature: float = hparam(1000.0)
  epsilon: float = hparam(0.0014)
  needs = frozenset({"images"})
  grid = {"temperature": (1.0, 10.0, 100.0, 1000.0), "epsilon": (0.0014, 0.0028)}
  reference_grid = {"temperature": (1.0, 10.0, 100.0, 1000.0),
                    "epsilon": (0.0, 0.0004, 0.0008, 0.0014, 0.002, 0.0024, 0.0028, 0.0032,
                                0.0038, 0.0048)}

  def check_hparams(self):
    scores.check_temperature(self.temperature)
    scores.check_epsilon(self.epsilon)

  def compute(self, params, hp, *, images, model, **unused):
    apply_fn, variables = model
    return scores.odin(_logits_fn(apply_fn), variables, images, hp["temperature"],
                       hp["epsilon"])


@register("mahalanobis")
@dataclasses.dataclass(frozen=True)
class Mahalanobis(Detector):
  """Mahalanobis distance to the closest class mean under one shared covariance, on the
  penultimate features, after input pre-processing of size ``epsilon``: ``max_c -1/2 (z(x') -
  mu_c)^T Sigma^-1 (z(x') - mu_c)``.

  Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
  Adversarial Attacks", NeurIPS 2018, as the reference applies it: last layer only. The
  reference's ``run.sh`` sweeps eps [0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]; OpenOOD's
  ``mds`` has no noise (eps=0) and no sweep.
  """
  epsilon: float = hparam(0.0014)
  needs = frozenset({"images"})
  fit_needs = frozenset({"train_features", "train_labels", "head"})
  grid = {"epsilon": (0.0,)}
  reference_grid = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}

  def check_hparams(self):
    scores.check_epsilon(self.epsilon)

  def fit_params(self, *, train_features, train_labels, head, **unused):
    return fit_class_gaussians(train_features, np.asarray(train_labels),
                               _num_classes(head, train_labels), "the penultimate features")

  def compute(self, params, hp, *, images, model, **unused):
    apply_fn, variables = model
    return scores.gaussian_score_with_noise(_features_fn(apply_fn), variables, images,
                                            as_mahalanobis_params(params), hp["epsilon"])


def layer_scores(apply_fn, variables, images, gaussians, epsilon):
  """``[N, L]``: each block's noisy Gaussian score (:func:`scores.gaussian_score_with_noise`)."""
  return jnp.stack([
      scores.gaussian_score_with_noise(_block_fn(apply_fn, i), variables, images,
                                       as_mahalanobis_params(gaussians[str(i)]), epsilon)
      for i in range(len(gaussians))], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _layer_scores_jit(apply_fn, variables, images, gaussians, epsilon):
  return layer_scores(apply_fn, variables, images, gaussians, epsilon)


@register("mahalanobis_ensemble")
@dataclasses.dataclass(frozen=True)
class MahalanobisEnsemble(Detector):
  """Lee et al.'s multi-layer Mahalanobis detector: per block ``l`` (the model's ``blocks``),
  class Gaussians with a shared covariance fitted on the training set, the input moved by
  ``epsilon`` against the gradient of the closest class's distance at that block, and the block's
  score ``max_c -1/2 d_c^2``; the score is the logistic regression ``sum_l w_l s_l + b`` whose
  weights are fitted on validation data (ID = positive vs OOD), not on any test OOD set.

  Lee et al., NeurIPS 2018, Sec. 2 ("feature ensemble", "input pre-processing"). ``fit`` takes the
  validation sets as ``validation=(images_in, images_out)`` (the evaluation protocol's: in
  :func:`energy_jax.ood.evaluation.run`, the ID test set against its validation OOD sets) and the
  model; the regression is sklearn's ``LogisticRegression(C=1)``
  (:mod:`energy_jax.detectors.logistic`; Lee et al. cross-validate C). Default eps=0.0014 (OpenOOD's ``mds_ensemble``, no sweep); the
  reference grid is Lee et al.'s eps list.
  """
  epsilon: float = hparam(0.0014)
  needs = frozenset({"images"})
  fit_needs = frozenset({"train_blocks", "train_labels", "head", "validation", "model"})
  grid = {"epsilon": (0.0014,)}
  reference_grid = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01, 0.05, 0.1, 0.2)}

  def check_hparams(self):
    scores.check_epsilon(self.epsilon)

  def fit_params(self, *, train_blocks, train_labels, head, validation, model, **unused):
    labels = np.asarray(train_labels)
    num_classes = _num_classes(head, labels)
    gaussians = {str(i): fit_class_gaussians(b, labels, num_classes, f"the features of block {i}")
                 for i, b in enumerate(train_blocks)}
    apply_fn, variables = model
    eps = jnp.asarray(self.epsilon, jnp.float32)
    fn = lambda x: _layer_scores_jit(apply_fn, variables, x, gaussians, eps)
    images_in, images_out = validation
    s_in = map_batches(fn, np.asarray(images_in), FIT_BATCH_SIZE)
    s_out = map_batches(fn, np.asarray(images_out), FIT_BATCH_SIZE)
    features = np.concatenate([s_in, s_out]).astype(np.float64)
    is_in = np.r_[np.ones(len(s_in), bool), np.zeros(len(s_out), bool)]
    weights, bias = logistic.fit_logistic_regression(features, is_in)
    return {"gaussians": gaussians, "weights": jnp.asarray(weights, jnp.float32),
            "bias": jnp.asarray(bias, jnp.float32)}

  def compute(self, params, hp, *, images, model, **unused):
    apply_fn, variables = model
    s = layer_scores(apply_fn, variables, images, params["gaussians"], hp["epsilon"])
    return s @ params["weights"] + params["bias"]
