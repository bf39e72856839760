"""Class-conditional Gaussians with a shared covariance as fitted params (the Mahalanobis
detectors'): plain dicts of float32 arrays, so that they save with Orbax."""

from __future__ import annotations

import jax.numpy as jnp

from energy_jax.ood import scores


def gaussian_params(means, precision) -> dict:
  """Class means ``[C, D]`` and a shared precision ``[D, D]`` as fitted params (float32)."""
  return {"means": jnp.asarray(means, jnp.float32), "precision": jnp.asarray(precision, jnp.float32)}


def fit_class_gaussians(features, labels, num_classes: int, what: str = "features") -> dict:
  """:func:`energy_jax.ood.scores.fit_mahalanobis` as fitted params (a zero covariance refused,
  a singular one warned about, ``what`` naming the features)."""
  fitted = scores.fit_mahalanobis(features, labels, num_classes, what)
  return gaussian_params(fitted.means, fitted.precision)


def as_mahalanobis_params(params: dict) -> scores.MahalanobisParams:
  """The fitted dict as :class:`energy_jax.ood.scores.MahalanobisParams`."""
  return scores.MahalanobisParams(params["means"], params["precision"])


def squared_distances(features, params: dict):
  """``[N, C]`` squared Mahalanobis distances to each mean of ``params``."""
  return scores.squared_distances(features, as_mahalanobis_params(params))
