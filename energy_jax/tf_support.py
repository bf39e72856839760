"""TensorFlow for the parts that use it (TFDS, the tf.data stream, TensorBoard event files),
imported on first use with the accelerators hidden from it, so that JAX keeps them, and quiet."""

from __future__ import annotations

import os

INSTALL_HINT = "pip install 'energy_jax[train]'"


def quiet_environment() -> None:
  """Sets TensorFlow's start-up switches unless the user set them: C++ info and warning logs
  off, and oneDNN's custom kernels off (TensorFlow 2.21 prints an info line about them on every
  import, whatever the log level). Only TensorFlow reads these; JAX's computations are the same.
  Must run before ``tensorflow`` is imported."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def import_tensorflow():
  """The ``tensorflow`` module, with GPUs and TPUs invisible to it and its start-up logs off."""
  quiet_environment()
  try:
    import tensorflow as tf
  except ModuleNotFoundError as e:
    what = ("TensorFlow, which is not installed" if e.name == "tensorflow" else
            f"TensorFlow, which cannot be imported: it needs the missing module {e.name!r}")
    raise ModuleNotFoundError(f"this part of energy-jax needs {what}: {INSTALL_HINT}",
                              name=e.name) from e
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # no such platform, or TF already initialised its devices
    pass
  return tf
