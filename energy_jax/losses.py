"""Training losses of energy-based fine-tuning and Outlier Exposure.

Per-example functions return ``[N]`` arrays (optax style); the ``*_loss``
functions return the scalar the reference optimises. All are keyword-only,
jit-compiled and computed in float32 whatever the logits' dtype.

References:
  Liu, Wang, Owens, Li. Energy-based Out-of-distribution Detection. NeurIPS 2020, Eq. (8)-(9).
  Hendrycks, Mazeika, Dietterich. Deep Anomaly Detection with Outlier Exposure. ICLR 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(logits: Array, name: str) -> Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"{name} must be [batch, num_classes], got shape {logits.shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {logits.dtype}")
  return logits.astype(jnp.float32)


@jax.jit
def softmax_cross_entropy(*, logits: Array, labels: Array) -> Array:
  """Per-example ``CE = logsumexp(f(x)) - f_y(x)`` for integer ``labels [N]`` -> ``[N]``; NaN
  where a label is outside ``[0, num_classes)``."""
  logits = _f32(logits, "logits")
  if labels.shape != logits.shape[:1]:
    raise ValueError(f"labels must be [{logits.shape[0]}], got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  # f_y by a select against the label's one-hot mask, not take_along_axis: the select's gradient
  # is elementwise and fuses, where take_along_axis's is a scatter-add (a kernel of its own in
  # every training step, with atomics that make GPU runs differ from run to run).
  picked = jnp.sum(jnp.where(labels[:, None] == jnp.arange(num_classes), logits, 0.0), axis=-1)
  picked = jnp.where((labels >= 0) & (labels < num_classes), picked, jnp.nan)
  return jax.nn.logsumexp(logits, axis=-1) - picked


def free_energy(logits: Array, name: str = "logits") -> Array:
  """Per-example free energy ``E(x) = -logsumexp f(x)`` in float32 (lower = in-distribution)."""
  return -jax.nn.logsumexp(_f32(logits, name), axis=-1)


@jax.jit
def energy_hinge_in(*, logits: Array, m_in: float) -> Array:
  """Per-example ``relu(E(x) - m_in)^2`` with ``E(x) = -logsumexp f(x)``: ID energy above m_in."""
  return jnp.square(jax.nn.relu(free_energy(logits, "logits_in") - m_in))


@jax.jit
def energy_hinge_out(*, logits: Array, m_out: float) -> Array:
  """Per-example ``relu(m_out - E(x))^2``: outlier energy below m_out."""
  return jnp.square(jax.nn.relu(m_out - free_energy(logits, "logits_out")))


@jax.jit
def energy_bounded_loss(*, logits_in: Array, logits_out: Array, m_in: float,
                        m_out: float) -> Array:
  """The energy regulariser ``L_energy`` of Liu et al. (2020), Eq. (9):

  ``mean_in relu(E(x_in) - m_in)^2 + mean_out relu(m_out - E(x_out))^2``.

  Squared hinges push in-distribution energies below ``m_in`` and auxiliary
  outlier energies above ``m_out`` (CIFAR-10: -23 / -5; CIFAR-100: -27 / -5).
  The fine-tuning objective is ``CE(in) + 0.1 * L_energy``.
  """
  return (jnp.mean(energy_hinge_in(logits=logits_in, m_in=m_in))
          + jnp.mean(energy_hinge_out(logits=logits_out, m_out=m_out)))


@jax.jit
def outlier_exposure_per_example(*, logits: Array) -> Array:
  """Per-example cross-entropy to the uniform distribution, ``logsumexp f(x) - mean_y f_y(x)``."""
  logits = _f32(logits, "logits_out")
  return jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)


@jax.jit
def outlier_exposure_loss(*, logits_out: Array) -> Array:
  """Outlier Exposure's term ``mean(logsumexp f(x) - mean f(x))`` on outliers (weight 0.5 in training)."""
  return jnp.mean(outlier_exposure_per_example(logits=logits_out))
