"""Detectors on the geometry of the penultimate features: relative Mahalanobis, SHE, ViM and
Residual (KNN is :mod:`energy_jax.detectors.knn`)."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.detectors.base import Detector, check_feature_size, hparam, register
from energy_jax.detectors.gaussians import (SingularCovarianceWarning, fit_class_gaussians,
                                            gaussian_params, gaussian_precision,
                                            squared_distances)

HIGHEST = jax.lax.Precision.HIGHEST


@register("relative_mahalanobis")
@dataclasses.dataclass(frozen=True)
class RelativeMahalanobis(Detector):
  """Relative Mahalanobis distance: ``max_c -(d_c(z)^2 - d_0(z)^2)`` where ``d_c`` is the
  distance to class ``c``'s mean under the shared class-centred covariance and ``d_0`` the
  distance to the mean of all training features under their own covariance.

  Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021
  (OpenOOD v1.5's ``rmds``; no hyper-parameters).
  """
  needs = frozenset({"features"})
  fit_needs = frozenset({"train_features", "train_labels", "head"})

  def fit_params(self, *, train_features, train_labels, head, **unused):
    z = np.asarray(train_features, np.float64)
    classes = fit_class_gaussians(z, np.asarray(train_labels), int(np.shape(head[0])[1]),
                                  "the training features (classes)")
    centred = z - z.mean(0)
    background = gaussian_params(z.mean(0)[None], gaussian_precision(
        centred.T @ centred / len(z), len(z), 1, "the training features (background)"))
    return {"classes": classes, "background": background}

  def check(self, params, inputs):
    check_feature_size(params["classes"], inputs, "precision")

  def compute(self, params, hp, *, features, **unused):
    d2 = squared_distances(features, params["classes"])
    d2_background = squared_distances(features, params["background"])[:, 0]
    return jnp.max(-d2, axis=-1) + d2_background


@register("she")
@dataclasses.dataclass(frozen=True)
class SHE(Detector):
  """Simplified Hopfield energy: ``<z, m_yhat>``, the inner product of the features with the
  stored pattern of the predicted class ``yhat = argmax f(x)``; ``m_k`` is the mean feature of
  the training examples of class ``k`` that the model classifies correctly (all of class ``k``'s
  examples if it classifies none of them correctly).

  Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns
  Memorization with Modern Hopfield Energy", ICLR 2023 (OpenOOD v1.5: inner product).
  """
  needs = frozenset({"logits", "features"})
  fit_needs = frozenset({"train_features", "train_labels", "train_logits"})

  def fit_params(self, *, train_features, train_labels, train_logits, **unused):
    z = np.asarray(train_features, np.float64)
    y = np.asarray(train_labels)
    num_classes = np.shape(train_logits)[1]
    missing = sorted(set(range(num_classes)) - set(y.tolist()))
    if missing:
      raise ValueError(f"SHE needs training examples of every class; classes {missing} have none")
    correct = np.asarray(train_logits).argmax(-1) == y
    # A class the model never gets right keeps the mean of all its examples (OpenOOD's mean of
    # an empty set would be NaN).
    patterns = np.stack([z[(correct if np.any(correct & (y == k)) else True) & (y == k)].mean(0)
                         for k in range(num_classes)])
    return {"patterns": jnp.asarray(patterns, jnp.float32)}

  def check(self, params, inputs):
    check_feature_size({"weight": params["patterns"].T}, inputs)

  def compute(self, params, hp, *, logits, features, **unused):
    stored = params["patterns"][jnp.argmax(logits, axis=-1)]
    return jnp.sum(features.astype(jnp.float32) * stored, axis=-1)


def fit_principal_residual(train_features, head, dim: int, what: str = "vim") -> dict:
  """ViM's origin ``u = -pinv(W^T) b`` and the basis ``R [D, D - dim]`` of the space orthogonal
  to the ``dim`` principal directions of the training features about ``u`` (eigenvectors of
  ``1/N sum (z - u)(z - u)^T``, float64 on the host).

  Features that all equal ``u`` are refused (no direction to choose). Features spanning at most
  ``dim`` directions about ``u`` (numerical rank, counted as :func:`gaussian_precision` does;
  always so for ``N <= dim`` examples) are warned about with a
  :class:`~energy_jax.detectors.gaussians.SingularCovarianceWarning`: the residual space then
  holds none of their variance, every training residual is rounding error, and the residual norms (ViM's
  ``alpha`` is their mean's inverse) measure nothing learnt.
  """
  z = np.asarray(train_features, np.float64)
  w, b = (np.asarray(a, np.float64) for a in head)
  n, d = z.shape
  dim = d // 2 if dim == 0 else int(dim)
  if not 0 < dim < d:
    raise ValueError(f"dim must lie in [1, {d - 1}] for D={d} features (0 = D // 2), got {dim}")
  origin = -np.linalg.pinv(w.T) @ b
  centred = z - origin
  eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(z))
  top = float(eigenvalues.max())
  if not top > 0:
    raise ValueError(f"degenerate subspace fit of {what!r}: all {n} training features equal the "
                     f"origin u = -pinv(W^T) b, so no direction is principal; fit on features "
                     "that vary")
  rank = int(np.sum(eigenvalues > d * np.finfo(np.float64).eps * top))
  if rank <= dim:
    warnings.warn(
        f"degenerate subspace fit of {what!r}: the {n} training feature vector(s) span {rank} of "
        f"the {d} dimensions about the origin u (at most N = {n}), no more than the dim = {dim} "
        f"principal ones, so the residual space of the other {d - dim} holds none of their "
        "variance and the residual norms are rounding error; fit on more than dim examples "
        "that vary, or lower dim", SingularCovarianceWarning, stacklevel=4)
  residual = eigenvectors[:, np.argsort(-eigenvalues)[dim:]]
  return {"origin": origin, "residual_basis": residual}


def residual_norm(features, params):
  """``||(z - u) R||``: the norm of the features' part outside the principal subspace."""
  centred = features.astype(jnp.float32) - params["origin"]
  return jnp.linalg.norm(jnp.matmul(centred, params["residual_basis"], precision=HIGHEST),
                         axis=-1)


_DIM_DOC = ("principal subspace dimension; 0 = D // 2 (OpenOOD's 256 of ResNet-18's 512 "
            "features, at the WRN's D)")


@register("vim")
@dataclasses.dataclass(frozen=True)
class ViM(Detector):
  """Virtual-logit matching: ``logsumexp(f(x)) - alpha * ||(z - u) R||``, with ``u``, ``R`` from
  :func:`fit_principal_residual` and ``alpha = mean_train max_c f_c / mean_train ||(z - u) R||``.

  Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022. OpenOOD v1.5
  sets dim 256 for ResNet-18 (D=512) and sweeps [256, 1000]; neither fits the WRN-40-2's D=128,
  so ``dim=0`` (the default) takes D // 2: OpenOOD's ratio, 64 for the WRN-40-2. No sweep.
  """
  dim: int = hparam(0, static=True, doc=_DIM_DOC)
  needs = frozenset({"logits", "features"})
  fit_needs = frozenset({"train_features", "head"})

  def check_hparams(self):
    if int(self.dim) != self.dim or self.dim < 0:
      raise ValueError(f"dim must be a non-negative integer (0 = D // 2), got {self.dim!r}")

  def fit_params(self, *, train_features, head, **unused):
    fitted = fit_principal_residual(train_features, head, self.dim, self.name)
    z = np.asarray(train_features, np.float64)
    train_logits = z @ np.asarray(head[0], np.float64) + np.asarray(head[1], np.float64)
    train_residual = np.linalg.norm((z - fitted["origin"]) @ fitted["residual_basis"], axis=-1)
    if not train_residual.mean() > 0:
      raise ValueError(f"degenerate subspace fit of 'vim': every training feature lies in the "
                       f"principal subspace (residual norm 0), so alpha = mean max logit / mean "
                       "residual norm is infinite; fit on more than dim examples that vary")
    alpha = train_logits.max(-1).mean() / train_residual.mean()
    return {k: jnp.asarray(v, jnp.float32) for k, v in {**fitted, "alpha": alpha}.items()}

  def check(self, params, inputs):
    check_feature_size({"weight": params["residual_basis"]}, inputs)

  def compute(self, params, hp, *, logits, features, **unused):
    energy = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return energy - params["alpha"] * residual_norm(features, params)


@register("residual")
@dataclasses.dataclass(frozen=True)
class Residual(Detector):
  """Residual: ``-||(z - u) R||``, the norm of the features outside their principal subspace
  (ViM without the logits).

  Wang et al., CVPR 2022 (the Residual baseline). OpenOOD v1.5 sets dim 512, all of ResNet-18's
  features (an empty residual); ``dim=0`` (the default) takes D // 2, as ``vim``.
  """
  dim: int = hparam(0, static=True, doc=_DIM_DOC)
  needs = frozenset({"features"})
  fit_needs = frozenset({"train_features", "head"})

  check_hparams = ViM.check_hparams

  def fit_params(self, *, train_features, head, **unused):
    fitted = fit_principal_residual(train_features, head, self.dim, self.name)
    return {k: jnp.asarray(v, jnp.float32) for k, v in fitted.items()}

  check = ViM.check

  def compute(self, params, hp, *, features, **unused):
    return -residual_norm(features, params)
