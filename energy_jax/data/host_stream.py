"""The host input path: tf.data streams of augmented in-distribution and outlier batches.

Batches are numpy dicts ``{"image": float32 NHWC normalised, "label": int32, "outlier": ...}``
ready for :func:`energy_jax.parallel.put_sharded`, for the indices of
:func:`energy_jax.data.sampling.epoch_indices`. The device-resident path
(:mod:`energy_jax.data.augment`, inside the compiled step) is faster for data that fits on the
device; this one serves data that does not. Needs TensorFlow (imported with the accelerators
hidden from it).
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np

from energy_jax.data.augment import MEAN, PAD, STD
from energy_jax.data.image_set import ImageSet
from energy_jax.data.sampling import epoch_indices
from energy_jax.tf_support import import_tensorflow

tf = import_tensorflow()


def normalize(images_uint8):
  """uint8 ``[..., 3]`` -> ``(x / 255 - mean) / std`` float32 (the reference's Normalize)."""
  x = tf.cast(images_uint8, tf.float32) / 255.0
  return (x - tf.constant(MEAN)) / tf.constant(STD)


def augment(image, seed):
  """Zero-pad 4, random crop of the image's size (offsets 0..8), random horizontal flip
  (stateless)."""
  padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
  offsets = tf.random.stateless_uniform((2,), seed, 0, 2 * PAD + 1, dtype=tf.int32)
  crop = tf.slice(padded, tf.concat([offsets, [0]], 0), image.shape)
  flip = tf.random.stateless_uniform((), seed + 1, 0, 2, dtype=tf.int32)
  return tf.cond(flip > 0, lambda: tf.reverse(crop, [1]), lambda: crop)


def _augmented(images: np.ndarray, idx: np.ndarray, columns: slice, seed: int,
               first_step: int = 0) -> tf.data.Dataset:
  """Batches of ``idx[first_step:, columns]`` (``idx [steps, B]``), example ``[s, c]`` augmented
  with the seed ``(seed, s * B + c)``: its position in the epoch, whichever process reads it
  and wherever a resumed epoch starts."""
  steps, width = idx.shape
  position = np.arange(steps * width, dtype=np.int64).reshape(steps, width)[first_step:, columns]
  ds = tf.data.Dataset.from_tensor_slices((idx[first_step:, columns].reshape(-1),
                                           position.reshape(-1).astype(np.int32)))
  ds = ds.map(
      lambda j, p: normalize(augment(tf.gather(images, tf.maximum(j, 0)), tf.stack([seed, p]))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(columns.stop - columns.start, drop_remainder=True)


def epoch_stream(train: ImageSet, outliers: Optional[ImageSet], in_idx: np.ndarray,
                 out_idx: np.ndarray, seed: int, epoch: int, padded: bool = False,
                 first_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """One epoch of augmented ``[in; outlier]`` batches for the indices of
  :func:`energy_jax.data.sampling.epoch_indices` (ID batch 128 and outlier batch 256 by default),
  each process reading its own columns of every batch (those of its devices) on multi-host
  setups. With ``padded`` every batch carries a ``mask`` (False for the padding, index -1, of
  the last partial batch). ``first_step``: where a resumed epoch starts."""
  import jax
  steps, batch = in_idx.shape
  host, hosts = jax.process_index(), jax.process_count()
  sl = slice(host * batch // hosts, (host + 1) * batch // hosts)
  ds = _augmented(tf.constant(train.images), in_idx, sl, seed * 1000 + epoch, first_step)
  labels = tf.data.Dataset.from_tensor_slices(
      train.labels[np.maximum(in_idx[first_step:, sl], 0)])
  parts = {"image": ds, "label": labels}
  if padded:
    parts["mask"] = tf.data.Dataset.from_tensor_slices(in_idx[first_step:, sl] >= 0)
  if outliers is not None:
    ob = out_idx.shape[1] // hosts
    parts["outlier"] = _augmented(tf.constant(outliers.images), out_idx,
                                  slice(host * ob, (host + 1) * ob), seed * 1000 + epoch + 500_000,
                                  first_step)
  ds = tf.data.Dataset.zip(parts).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def train_stream(train: ImageSet, outliers: Optional[ImageSet] = None, batch_size: int = 128,
                 outlier_batch_size: int = 256, seed: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled, augmented ID (+ outlier) batches, reshuffled each epoch (full batches)."""
  epoch = 0
  while True:
    in_idx, out_idx = epoch_indices(seed, epoch, len(train), batch_size,
                                    len(outliers) if outliers is not None else 0,
                                    outlier_batch_size, drop_remainder=True)
    yield from epoch_stream(train, outliers, in_idx, out_idx, seed, epoch)
    epoch += 1


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """Every example exactly once: normalised batches, the last padded, with a ``mask``."""
  ds = tf.data.Dataset.from_tensor_slices(images).map(normalize).batch(batch_size)
  for x in ds.as_numpy_iterator():
    mask = np.ones(batch_size, bool)
    if len(x) < batch_size:
      mask[len(x):] = False
      x = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
    yield {"image": x, "mask": mask}
