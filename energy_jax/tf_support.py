"""TensorFlow for the parts that use it (TFDS, the tf.data stream, TensorBoard event files),
imported on first use with the accelerators hidden from it, so that JAX keeps them."""

from __future__ import annotations

import os


def import_tensorflow():
  """The ``tensorflow`` module, with GPUs and TPUs invisible to it and its C++ info logs off."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # no such platform, or TF already initialised its devices
    pass
  return tf
