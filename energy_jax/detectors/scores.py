"""The jitted OOD scores that the detectors compute and users call directly; every score here is
*higher = more in-distribution* (re-exported as :mod:`energy_jax.ood.scores` and at the package's
top level).

Energy-based OOD detection (Liu, Wang, Owens, Li. "Energy-based Out-of-distribution
Detection", NeurIPS 2020, arXiv:2010.03759) scores an input by its negative free
energy ``-E(x; f) = T * logsumexp(f(x) / T)``. The baselines the paper compares
against are here too: the maximum softmax probability (Hendrycks & Gimpel, 2017),
ODIN (Liang et al., 2018) and the Mahalanobis detector (Lee et al., 2018).

All logit scores take ``logits`` of shape ``[..., num_classes]`` (numpy or jax,
any leading shape) and return ``[...]`` float32. Shapes and dtypes are checked at
trace time; a row holding NaN or +-inf gets a NaN score (documented, so that a
single bad row does not hide behind a finite number; :func:`energy_jax.ood.metrics.ood_metrics`
refuses NaN scores). Temperatures and noise magnitudes are traced, not static: a grid of values
compiles once per input shape; their values are checked on the caller's side before the call.
A value traced by the caller's own ``jit`` cannot be checked (nor raise) there: a temperature
outside float32's normal range ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (negative, 0, NaN, inf) or
a negative or non-finite ``epsilon`` gives NaN for every score, never a plausible number.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax import losses
from energy_jax.arrays import check_plain_real, widen_host_half
from energy_jax.data.augment import STD
from energy_jax.detectors.base import check_range
from energy_jax.detectors.gaussians import MahalanobisParams, squared_distances

Array = jax.Array


def _check_logits(logits: Array, name: str = "logits") -> Array:
  if logits.ndim < 1:
    raise ValueError(f"{name} must have a class axis, got a rank-0 array")
  if logits.shape[-1] < 1:
    raise ValueError(f"{name} has an empty class axis: shape {logits.shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {logits.dtype}")
  # float16 / bfloat16 logits are scored in float32: their 3 or 8 significant bits would round
  # the logsumexp of a confident row to its maximum.
  return logits.astype(jnp.float32) if logits.dtype != jnp.float64 else logits


def _as_array(x: Any, name: str) -> Any:
  """``x`` as an array the jitted scores take: arrays (numpy of any float dtype, jax, tracers)
  pass as they are; other array-likes (lists, tuples, scalars) go through ``np.asarray``, integer
  ones as float (a list of whole numbers is still logits). An integer *array* is refused: labels
  passed as logits are a bug to report; so are masked and complex arrays (their mask or
  imaginary part would be dropped)."""
  check_plain_real(x, name)
  if isinstance(x, (np.ndarray, jax.Array, jax.core.Tracer)):
    if not jnp.issubdtype(x.dtype, jnp.floating):   # named before JAX narrows int64 to int32
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    return widen_host_half(x)
  try:
    arr = np.asarray(x)
  except (TypeError, ValueError) as e:           # ragged lists
    raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}: {e}") from None
  if arr.dtype.kind in "iu":
    arr = arr.astype(np.float64)
  if arr.dtype.kind not in "f" and arr.dtype != jnp.bfloat16:
    raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__} of dtype "
                    f"{arr.dtype}")
  return widen_host_half(arr)


# XLA flushes subnormal floats to zero: below float32's smallest normal number a temperature
# would divide by 0.
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)
MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def _check_number(value, name: str) -> float:
  if isinstance(value, (str, bytes, bool, np.bool_)) or np.ndim(value) != 0:
    raise TypeError(f"{name} must be a number, got {value!r}")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number, got {value!r}") from None


def check_temperature(temperature) -> None:
  """Raises naming the value unless ``temperature`` is a number in ``(0, inf)`` that float32
  holds (in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``); a value traced by the caller's ``jit``
  passes (see the module docstring). The scores' and the detectors' check."""
  if isinstance(temperature, jax.core.Tracer):
    return
  _check_number(temperature, "temperature")
  check_range("temperature", temperature, 0.0, np.inf, low_open=True, high_open=True)


def check_epsilon(epsilon) -> None:
  """Raises naming the value unless ``epsilon`` is a number in ``[0, inf)`` that float32 holds;
  a value traced by the caller's ``jit`` passes. The scores' and the detectors' check."""
  if isinstance(epsilon, jax.core.Tracer):
    return
  _check_number(epsilon, "epsilon")
  check_range("epsilon", epsilon, 0.0, np.inf, high_open=True)


def _nan_unless_valid(score: Array, temperature=None, epsilon=None) -> Array:
  """``score`` where the traced hyper-parameters are valid, NaN where not: inside a caller's
  ``jit`` they reach the score unchecked, and an invalid one must not give a plausible number.
  Python numbers were checked before the call and pass as they are."""
  valid = True
  if temperature is not None and not isinstance(temperature, (int, float)):
    valid = (temperature >= MIN_TEMPERATURE) & (temperature <= MAX_TEMPERATURE)
  if epsilon is not None and not isinstance(epsilon, (int, float)):
    valid = valid & (epsilon >= 0) & jnp.isfinite(epsilon)
  return score if valid is True else jnp.where(valid, score, jnp.nan)


class _CheckedJit:
  """A jitted function whose hyper-parameter checks run on the caller's Python values first.

  Hyper-parameters are traced (a new temperature does not recompile), so they cannot be checked
  inside the trace; ``check(bound_arguments)`` runs before each call instead. Everything a jitted
  function has (``lower``, ``trace``, ``eval_shape``, ...) is the jitted function's.
  """

  def __init__(self, fn: Callable, check: Callable[[Dict[str, Any]], None],
               arrays: Tuple[str, ...] = (), **jit_kwargs):
    self._jitted = jax.jit(fn, **jit_kwargs)
    self._signature = inspect.signature(fn)
    self._check = check
    self._arrays = arrays
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    bound = self._signature.bind(*args, **kwargs)
    with_defaults = self._signature.bind(*args, **kwargs)
    with_defaults.apply_defaults()
    self._check(with_defaults.arguments)
    for name in self._arrays:        # lists, scalars, ... as arrays (the defaults stay unpassed)
      if name in bound.arguments:
        bound.arguments[name] = _as_array(bound.arguments[name], name)
    return self._jitted(*bound.args, **bound.kwargs)

  def __getattr__(self, name):
    return getattr(self._jitted, name)


def _checks_temperature(arguments) -> None:
  check_temperature(arguments["temperature"])


def _checks_temperature_epsilon(arguments) -> None:
  check_temperature(arguments["temperature"])
  check_epsilon(arguments["epsilon"])
  check_plain_real(arguments["images"], "images")


def _checks_epsilon(arguments) -> None:
  check_epsilon(arguments["epsilon"])
  check_plain_real(arguments["images"], "images")


def _no_check(arguments) -> None:
  pass


def _nan_where_nonfinite(logits: Array, score: Array) -> Array:
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  return jnp.where(finite, score, jnp.nan)


def _tempered(score: Callable[[Array, Array, Any], Array], logits: Array,
              temperature: Array | float) -> Array:
  """``score(x, T, shift)`` of the logits tempered by ``T``: ``x = logits / T``, ``shift = None``
  for ``T >= 1``, or ``x = (logits - m) / T``, ``shift = m`` (the row's maximum) for ``T < 1``;
  ``softmax(x) = softmax(logits / T)`` either way, and ``logsumexp(logits / T) = logsumexp(x) +
  shift / T``.

  ``T >= 1`` divides the logits smaller: the plain formula, bit for bit (its own branch of a
  ``lax.cond``, so that nothing else fuses into it). ``T < 1`` magnifies them: ``logits /
  T`` would overflow or, XLA fusing ``l / T - max(l / T)`` into ``l * (1 / T) - M`` with one
  rounding, be off by ulps of a huge number, enough for ``exp`` to overflow. Shifted first, the
  largest entry of ``x`` is exactly 0 and the others are negative: every score stays finite and
  tends to its limit as ``T -> 0`` (the maximum logit; 1 / the number of classes tied at it).
  """
  def plain(l, t):
    return score(l / t, t, None)

  def shifted(l, t):
    top = jnp.max(l, axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))  # non-finite rows: as is
    return score((l - top) / t, t, top[..., 0])

  if isinstance(temperature, (int, float)):       # a Python number: the branch is known now
    return (shifted if temperature < 1.0 else plain)(logits, temperature)
  return jax.lax.cond(temperature < 1.0, shifted, plain, logits, temperature)


def _energy_of(x: Array, t: Array | float, shift: Optional[Array]) -> Array:
  lse = t * jax.nn.logsumexp(x, axis=-1)
  return lse if shift is None else lse + shift


def _msp_of(x: Array, t: Array | float, shift: Optional[Array]) -> Array:
  return jnp.max(jax.nn.softmax(x, axis=-1), axis=-1)


def energy(logits: Array, temperature: Array | float = 1.0) -> Array:
  """``T * logsumexp(logits / T)`` over the last axis, unchecked (for use inside traced code);
  finite for finite logits at any temperature in float32's normal range (see :func:`_tempered`;
  below ``T ~ 1e-37`` its gradient ``softmax(logits / T)`` underflows through subnormals)."""
  return _tempered(_energy_of, logits, temperature)


def _energy_score(logits: Array, temperature: float = 1.0) -> Array:
  """Negative free energy ``-E(x) = T * logsumexp(logits / T)`` (higher = in-dist).

  Args:
    logits: ``[..., num_classes]`` floating-point logits f(x).
    temperature: T > 0, traced (a new value does not recompile). The paper uses T=1.

  Returns:
    ``[...]`` float32 scores; NaN for rows with non-finite logits, and for all of them when
    ``temperature`` is traced by the caller's ``jit`` and invalid (see the module docstring).

  Reference: Liu et al., NeurIPS 2020, Eq. (6)-(7).
  """
  logits = _check_logits(logits)
  return _nan_unless_valid(_nan_where_nonfinite(logits, energy(logits, temperature)), temperature)


energy_score = _CheckedJit(_energy_score, _checks_temperature, arrays=("logits",))


def _free_energy(logits: Array, temperature: float = 1.0) -> Array:
  """Free energy ``E(x) = -T * logsumexp(logits / T)`` (lower = in-distribution)."""
  return -_energy_score(logits, temperature)


free_energy = _CheckedJit(_free_energy, _checks_temperature, arrays=("logits",))


def _msp_score(logits: Array, temperature: float = 1.0) -> Array:
  """Maximum softmax probability ``max_y softmax(logits / T)_y`` (Hendrycks & Gimpel, 2017);
  ``temperature`` traced."""
  logits = _check_logits(logits)
  score = _tempered(_msp_of, logits, temperature)
  return _nan_unless_valid(_nan_where_nonfinite(logits, score), temperature)


msp_score = _CheckedJit(_msp_score, _checks_temperature, arrays=("logits",))


def _max_logit_score(logits: Array) -> Array:
  """Maximum logit ``max_y f_y(x)`` (Hendrycks et al., 2022)."""
  logits = _check_logits(logits)
  return _nan_where_nonfinite(logits, jnp.max(logits, axis=-1))


max_logit_score = _CheckedJit(_max_logit_score, _no_check, arrays=("logits",))


def _sign_step(grad: Array, input_std: Sequence[float]) -> Array:
  """The reference's ``(ge(grad, 0) - 0.5) * 2 / std``: sign with 0 -> +1, per channel."""
  sign = jnp.where(grad >= 0, 1.0, -1.0)
  return sign / jnp.asarray(input_std, jnp.float32)


def odin(apply_fn: Callable[[Any, Array], Any], variables: Any, images: Array,
         temperature: Array | float, epsilon: Array | float,
         input_std: Sequence[float] = STD) -> Array:
  """ODIN's score, unchecked and traceable (see :func:`odin_score`); ``apply_fn`` returns logits."""
  images = jnp.asarray(images, jnp.float32)

  def nll(x):
    logits = apply_fn(variables, x).astype(jnp.float32)
    labels = jnp.argmax(logits, axis=-1)
    # Sum, not mean: only the sign of each example's own gradient is used.
    return jnp.sum(losses.softmax_cross_entropy(logits=logits / temperature, labels=labels))

  grad = jax.grad(nll)(images)
  perturbed = images - epsilon * _sign_step(grad, input_std)
  logits = apply_fn(variables, perturbed).astype(jnp.float32)
  return _msp_score(logits, temperature)


def _odin_score(apply_fn: Callable[[Any, Array], Array], variables: Any, images: Array, *,
                temperature: float = 1000.0, epsilon: float = 0.0014,
                input_std: Tuple[float, float, float] = STD) -> Array:
  """ODIN: temperature-scaled MSP after a small input perturbation (Liang et al., 2018).

  ``x' = x - epsilon * sign(-grad_x log S_yhat(x; T)) / std`` with
  ``yhat = argmax f(x)``; the score is ``max_y softmax(f(x') / T)_y``. The sign is
  divided by the normalisation std per channel because ``x`` is already
  normalised, exactly as the reference (``utils/score_calculation.py``) does.
  ``temperature`` and ``epsilon`` are traced: a grid over both compiles once per input shape
  (``epsilon=0`` runs the gradient too and leaves the input unchanged).

  Args:
    apply_fn: ``apply_fn(variables, images) -> logits`` in inference mode; must be
      hashable (a module-level function or ``model.apply`` wrapped once).
    variables: the model's variables.
    images: ``[N, H, W, C]`` normalised images.
    temperature: T (1000 in ODIN's paper).
    epsilon: perturbation magnitude on the 0..1 pixel scale (0 disables it).
    input_std: per-channel normalisation std.

  Returns:
    ``[N]`` scores.
  """
  return _nan_unless_valid(odin(apply_fn, variables, images, temperature, epsilon, input_std),
                           temperature, epsilon)


odin_score = _CheckedJit(_odin_score, _checks_temperature_epsilon,
                         static_argnames=("apply_fn", "input_std"))


def gaussian_score_with_noise(features_fn: Callable[[Any, Array], Array], variables: Any,
                              images: Array, params: MahalanobisParams, epsilon: Array | float,
                              input_std: Sequence[float] = STD) -> Array:
  """Lee et al.'s input pre-processing for one layer, unchecked and traceable: the input moves
  against the gradient of the distance to its closest class, ``x' = x - epsilon *
  sign(grad_x 1/2 d_yhat(x)^2) / std``, and the score is
  :func:`~energy_jax.detectors.gaussians.mahalanobis_from_features` of
  ``features_fn`` at ``x'`` (``epsilon=0``: at ``x``)."""
  images = jnp.asarray(images, jnp.float32)

  def half_d2_closest(x):
    d2 = squared_distances(features_fn(variables, x), params)
    closest = jax.lax.stop_gradient(jnp.argmin(d2, axis=-1))
    return 0.5 * jnp.sum(jnp.take_along_axis(d2, closest[:, None], axis=-1))

  grad = jax.grad(half_d2_closest)(images)
  perturbed = images - epsilon * _sign_step(grad, input_std)
  return jnp.max(-0.5 * squared_distances(features_fn(variables, perturbed), params), axis=-1)


def _mahalanobis_score(features_fn: Callable[[Any, Array], Array], variables: Any,
                       images: Array, params: MahalanobisParams, *, epsilon: float = 0.0,
                       input_std: Tuple[float, float, float] = STD) -> Array:
  """Mahalanobis score (Lee et al., 2018) on penultimate features, with input pre-processing.

  With ``epsilon > 0`` the input first moves against the gradient of the
  distance to its closest class, ``x' = x - epsilon * sign(grad_x 1/2 d_yhat^2) / std``,
  as the reference does; the score is
  :func:`~energy_jax.detectors.gaussians.mahalanobis_from_features` at ``x'``.
  ``epsilon`` is traced (a grid compiles once; 0 runs the gradient and leaves ``x`` unchanged).

  Args:
    features_fn: ``features_fn(variables, images) -> [N, D]`` in inference mode (hashable).
    variables: the model's variables.
    images: ``[N, H, W, C]`` normalised images.
    params: from :func:`~energy_jax.detectors.gaussians.fit_mahalanobis`.
    epsilon: noise magnitude (0 = no pre-processing).
    input_std: per-channel normalisation std.
  """
  return _nan_unless_valid(
      gaussian_score_with_noise(features_fn, variables, images, params, epsilon, input_std),
      epsilon=epsilon)


mahalanobis_score = _CheckedJit(_mahalanobis_score, _checks_epsilon,
                                static_argnames=("features_fn", "input_std"))
