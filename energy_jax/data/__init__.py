"""Data: image sources by name (folders, zips, ``.npy``, TFDS, and any registered kind), the
run's data sets, on-device augmentation, index sampling, the tf.data host stream, and the
synthetic and toy sets. Nothing here imports TensorFlow until a TFDS source or the host stream
is used."""

import importlib.util

from energy_jax.data import augment, sampling, sources, synthetic
from energy_jax.data import sklearn_images  # noqa: F401  registers "sklearn:"
from energy_jax.data import tfds_source  # noqa: F401  registers "tfds:"
from energy_jax.data.image_set import ImageSet
from energy_jax.data.run_data import RunData, count_run_data, load_run_data, run_sources
from energy_jax.data.sources import count, load, load_cached, register



def host_stream_available() -> bool:
  """Whether TensorFlow, which the tf.data host stream needs, is installed."""
  return importlib.util.find_spec("tensorflow") is not None


__all__ = ["host_stream_available", "augment", "sampling", "sources", "synthetic", "ImageSet", "RunData",
           "count_run_data", "load_run_data", "run_sources", "count", "load", "load_cached",
           "register"]
