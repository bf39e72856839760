"""Checks and conversions of the arrays that users hand to the scores, the detectors and the
metrics: masked and complex arrays refused (their mask or imaginary part would be dropped
without a word), half precision widened on the host."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_plain_real(x, name: str) -> None:
  """Raises ``TypeError`` naming ``name`` for a masked array (``np.asarray`` drops its mask: every
  value, masked or not, would count) or a complex one (casting to float drops the imaginary
  part); any other input passes (arrays, tracers, lists)."""
  if isinstance(x, np.ma.MaskedArray):
    raise TypeError(f"{name} is a masked array, whose mask would be ignored (every value, masked "
                    "or not, would count): pass a plain array of the values to use")
  dtype = getattr(x, "dtype", None)
  if dtype is None and isinstance(x, (list, tuple, complex)):
    try:
      dtype = np.asarray(x).dtype
    except (TypeError, ValueError):       # ragged: the caller's own conversion names it
      return
  if dtype is not None and np.issubdtype(dtype, np.complexfloating):
    raise TypeError(f"{name} must be real, got dtype {dtype}: its imaginary part would be "
                    "dropped")


def widen_host_half(x: Any) -> Any:
  """``x`` with a float16 array on the host (numpy, or a jax array on a CPU device) widened to
  float32 there, exactly. XLA:CPU converts half precision with the F16C instructions; on an x86
  CPU without them its compiled convert fails to link (``__extendhfsf2``), so half-precision
  inputs reach the jitted scores as float32. Other arrays, tracers and GPU/TPU arrays pass."""
  if getattr(x, "dtype", None) != np.float16 or isinstance(x, jax.core.Tracer):
    return x
  if isinstance(x, jax.Array) and not all(d.platform == "cpu" for d in x.devices()):
    return x
  return np.asarray(x).astype(np.float32)
