"""JAX's persistent compilation cache, on by default in the scripts and notebooks.

A run compiles its training epoch, its evaluation and its detectors once per configuration; with
the cache, a second run of the same configuration (another seed, a resumed run, the evaluation
after training) loads the compiled programs from disk instead of compiling them again.

The folder: the argument of :func:`enable` (the scripts' ``--compilation_cache``), else
``$ENERGY_JAX_COMPILATION_CACHE``, else ``jax_compilation_cache`` in the energy-jax cache
(``~/.cache/energy_jax``, or ``$ENERGY_JAX_CACHE``). ``""`` or ``off`` turns it off.

JAX keys each entry by the program, the devices, the compile options, ``XLA_FLAGS`` and the
jax/jaxlib versions, so a cached program is the one a fresh compile would give. It caches programs
that took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s by default) to compile;
entries are compressed, and one cut short (a killed writer) fails its check when read and is
compiled again. In a multi-process run, process 0 writes and every process reads; on XLA:CPU
the other processes' keys differ (they hash each process's own device topology), so only process
0 loads its programs from the cache (docs/performance.md).
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "ENERGY_JAX_COMPILATION_CACHE"
OFF = ("", "off")
FOLDER = "jax_compilation_cache"


def folder(given: Optional[str] = None) -> Optional[str]:
  """The cache folder :func:`enable` uses for ``given`` (None: the environment, then the
  default), or None when the cache is off."""
  from energy_jax import fetch
  value = given if given is not None else os.environ.get(ENV)
  if value is None:
    return os.path.join(fetch.cache_dir(), FOLDER)
  if value.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(given: Optional[str] = None) -> Optional[str]:
  """Turns JAX's persistent compilation cache on in :func:`folder` (``given``), or off; returns
  the folder, or None. Call it before the first compilation: JAX reads the setting then.

  Raises ``ValueError`` naming the folder when it cannot be made or written (a path given on
  purpose must work); the default folder falls back to no cache with a warning instead.
  """
  import jax
  path = folder(given)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  problem = _unwritable(path)
  if problem:
    if given is None and os.environ.get(ENV) is None:
      import warnings
      warnings.warn(f"no compilation cache: {problem} (set {ENV} to a writable folder, or "
                    "'off')")
      jax.config.update("jax_enable_compilation_cache", False)
      return None
    raise ValueError(f"compilation cache {path}: {problem} (give a writable folder, or 'off')")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def _unwritable(path: str) -> Optional[str]:
  """Why ``path`` cannot serve as the cache folder, or None."""
  if os.path.exists(path) and not os.path.isdir(path):
    return "it is a file, not a folder"
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    return f"cannot be made ({e.strerror})"
  if not os.access(path, os.W_OK | os.X_OK):
    return "it is not writable"
  return None
