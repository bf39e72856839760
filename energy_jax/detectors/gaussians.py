"""Class-conditional Gaussians with a shared covariance (the Mahalanobis detectors'): the fit on
training features (Lee et al., NeurIPS 2018, as the reference fits them with sklearn's
``EmpiricalCovariance``), its degeneracy checks, and the squared distances to the class means.

Fitted params are plain dicts of float32 arrays (:func:`gaussian_params`), so that they save with
Orbax; :class:`MahalanobisParams` is the same pair as a named tuple.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax.arrays import check_plain_real

Array = jax.Array


class MahalanobisParams(NamedTuple):
  """Class-conditional Gaussians with a shared covariance: ``means [C, D]``, ``precision
  [D, D]``."""
  means: Array
  precision: Array


class SingularCovarianceWarning(UserWarning):
  """A Gaussian fit whose covariance is singular or nearly so (see :func:`gaussian_precision`)."""


def gaussian_precision(cov: np.ndarray, num_examples: int, num_means: int,
                       what: str = "features") -> np.ndarray:
  """The precision ``pinv(Sigma)`` of a covariance ``Sigma [D, D]`` estimated from
  ``num_examples`` vectors centred on ``num_means`` means, checked for degeneracy.

  ``Sigma = 0`` (every feature constant around its mean) is refused: every distance would be 0
  and every input would score the same. A singular ``Sigma`` -- numerical rank ``r < D``, with
  eigenvalues below ``D * eps * lambda_max`` counted as 0; at most ``num_examples - num_means``,
  so fewer examples than dimensions is always singular -- is warned about
  (:class:`SingularCovarianceWarning`): the pseudo-inverse ignores the ``D - r`` directions
  without variance, and those with a variance near rounding error weigh enormously.
  """
  dim = cov.shape[0]
  eigenvalues = np.linalg.eigvalsh(cov)
  top = float(eigenvalues.max()) if dim else 0.0
  if not top > 0:
    raise ValueError(
        f"degenerate Gaussian fit on {what}: the covariance of the {dim} dimensions around the "
        f"{num_means} mean(s) is zero (every dimension is constant within each class), so every "
        "Mahalanobis distance would be 0; fit on features that vary")
  cutoff = dim * np.finfo(np.float64).eps * top
  rank = int(np.sum(eigenvalues > cutoff))
  if rank < dim:
    constant = int(np.sum(np.diag(cov) <= cutoff))
    warnings.warn(
        f"singular Gaussian fit on {what}: the covariance of the {dim} dimensions has numerical "
        f"rank {rank} ({num_examples} examples around {num_means} mean(s) give at most "
        f"{max(num_examples - num_means, 0)}; {constant} dimension(s) constant within every "
        f"class); the precision is a pseudo-inverse that ignores {dim - rank} direction(s), and "
        "directions whose variance is near rounding error weigh heavily in the distances",
        SingularCovarianceWarning, stacklevel=3)
  return np.linalg.pinv(cov, hermitian=True)


def fit_mahalanobis(features: Array, labels: Array, num_classes: int,
                    what: str = "features") -> MahalanobisParams:
  """Fits class means and one shared (tied) covariance on training features.

  The covariance is the maximum-likelihood estimate of the class-centred
  features, ``Sigma = 1/N sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T`` (sklearn's
  ``EmpiricalCovariance`` as the reference uses it), and the precision is its
  pseudo-inverse (:func:`gaussian_precision`: a zero covariance is refused, a singular one
  warned about). Computed in float64 on the host.

  Args:
    features: ``[N, D]`` penultimate features of the training set.
    labels: ``[N]`` integer labels in ``[0, num_classes)``.
    num_classes: C; every class must have at least one example.
    what: names the features in errors and warnings (e.g. a block of the network).
  """
  check_plain_real(features, what)
  check_plain_real(labels, "labels")
  z = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if z.ndim != 2 or y.shape != (z.shape[0],):
    raise ValueError(f"features must be [N, D] and labels [N], got {z.shape} and {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"labels must be integers, got dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  counts = np.bincount(y, minlength=num_classes)
  if np.any(counts == 0):
    raise ValueError(f"classes without examples: {np.flatnonzero(counts == 0).tolist()}")
  if not np.all(np.isfinite(z)):
    raise ValueError(f"{what} contain NaN or inf")
  means = np.stack([z[y == c].mean(axis=0) for c in range(num_classes)])
  centred = z - means[y]
  cov = centred.T @ centred / z.shape[0]
  precision = gaussian_precision(cov, z.shape[0], num_classes, what)
  return MahalanobisParams(jnp.asarray(means, jnp.float32), jnp.asarray(precision, jnp.float32))


def squared_distances(features: Array, params: MahalanobisParams | dict) -> Array:
  """``d_c(z)^2 = (z - mu_c)^T P (z - mu_c)`` for ``features [N, D]`` -> ``[N, C]`` (``params``:
  :class:`MahalanobisParams` or the fitted dict of :func:`gaussian_params`)."""
  if isinstance(params, dict):
    params = as_mahalanobis_params(params)
  diff = features.astype(jnp.float32)[:, None, :] - params.means[None, :, :]
  return jnp.einsum("ncd,de,nce->nc", diff, params.precision, diff,
                    precision=jax.lax.Precision.HIGHEST)


@jax.jit
def mahalanobis_from_features(features: Array, params: MahalanobisParams) -> Array:
  """``max_c -1/2 (z - mu_c)^T P (z - mu_c)`` for ``features [N, D]`` -> ``[N]``.

  This is the reference's Gaussian score: ``-1/2`` times the smallest squared
  Mahalanobis distance, so it ranks inputs exactly as ``-min_c d_c(z)``.
  """
  return jnp.max(-0.5 * squared_distances(jnp.asarray(features), params), axis=-1)


def gaussian_params(means, precision) -> dict:
  """Class means ``[C, D]`` and a shared precision ``[D, D]`` as fitted params (float32)."""
  return {"means": jnp.asarray(means, jnp.float32),
          "precision": jnp.asarray(precision, jnp.float32)}


def fit_class_gaussians(features, labels, num_classes: int, what: str = "features") -> dict:
  """:func:`fit_mahalanobis` as fitted params (a zero covariance refused, a singular one warned
  about, ``what`` naming the features)."""
  fitted = fit_mahalanobis(features, labels, num_classes, what)
  return gaussian_params(fitted.means, fitted.precision)


def as_mahalanobis_params(params: dict) -> MahalanobisParams:
  """The fitted dict as :class:`MahalanobisParams`."""
  return MahalanobisParams(params["means"], params["precision"])
