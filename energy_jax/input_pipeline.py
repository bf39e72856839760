"""tf.data streams of in-distribution, outlier and OOD images (TFDS or in-memory sources).

Importing this module hides GPUs/TPUs from TensorFlow so that JAX keeps the
accelerator. Batches are numpy dicts ``{"image": float32 NHWC normalised,
"label": int32}`` ready for :func:`energy_jax.parallel.put_sharded`. For data that
fits in memory the device-resident path of :mod:`energy_jax.train` is faster;
these streams serve data that does not, and the TFDS sets.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np
import tensorflow as tf

from energy_jax.datasets import ImageSet
from energy_jax.scores import CIFAR_MEAN, CIFAR_STD

tf.config.set_visible_devices([], "GPU")
try:
  tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # pragma: no cover - no TPU platform registered
  pass


def load_tfds_arrays(name: str, split: str, data_dir: Optional[str] = None) -> ImageSet:
  """A whole TFDS split as uint8 arrays (images resized as the reference's OOD loaders)."""
  import tensorflow_datasets as tfds
  if name not in tfds.list_builders():
    raise ValueError(f"unknown TFDS dataset {name!r}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
  except Exception as e:
    raise RuntimeError(f"TFDS dataset {name!r} is not downloaded and could not be prepared "
                       f"(offline?): {type(e).__name__}: {e}. Download it once with "
                       f"`tfds build {name}` or pass an image folder / zip / .npy") from e
  ds = builder.as_dataset(split=split, as_supervised=False)
  label_key = "label" if "label" in builder.info.features else None
  images, labels = [], []
  for ex in tfds.as_numpy(ds.map(lambda e: (_to_32(e["image"]),
                                            e[label_key] if label_key else tf.constant(0)),
                                 num_parallel_calls=tf.data.AUTOTUNE).batch(1024)):
    images.append(ex[0])
    labels.append(ex[1])
  names = tuple(builder.info.features[label_key].names) if label_key else ("",)
  return ImageSet(np.concatenate(images).astype(np.uint8),
                  np.concatenate(labels).astype(np.int32), names, f"tfds:{name}:{split}")


def _to_32(image):
  """Grayscale to RGB; Resize(32) on the short side + CenterCrop(32) unless already 32x32."""
  image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image[..., :3]
  shape = tf.shape(image)
  h, w = shape[0], shape[1]

  def resize():
    short = tf.minimum(h, w)
    new_h = tf.cast(32 * h / short, tf.int32)
    new_w = tf.cast(32 * w / short, tf.int32)
    r = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
    top, left = (new_h - 32 + 1) // 2, (new_w - 32 + 1) // 2
    return tf.cast(tf.round(r[top:top + 32, left:left + 32]), tf.uint8)
  same = tf.logical_and(tf.equal(h, 32), tf.equal(w, 32))
  return tf.ensure_shape(tf.cond(same, lambda: tf.cast(image, tf.uint8), resize), (32, 32, 3))


def normalize(images_uint8):
  """uint8 ``[..., 3]`` -> ``(x / 255 - mean) / std`` float32 (the reference's Normalize)."""
  x = tf.cast(images_uint8, tf.float32) / 255.0
  return (x - tf.constant(CIFAR_MEAN)) / tf.constant(CIFAR_STD)


def augment(image, seed):
  """Zero-pad 4, random 32x32 crop (offsets 0..8), random horizontal flip (stateless)."""
  padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
  offsets = tf.random.stateless_uniform((2,), seed, 0, 9, dtype=tf.int32)
  crop = tf.slice(padded, tf.concat([offsets, [0]], 0), [32, 32, 3])
  flip = tf.random.stateless_uniform((), seed + 1, 0, 2, dtype=tf.int32)
  return tf.cond(flip > 0, lambda: tf.reverse(crop, [1]), lambda: crop)


def _augmented(images: np.ndarray, idx: np.ndarray, batch: int, seed: int) -> tf.data.Dataset:
  ds = tf.data.Dataset.from_tensor_slices(idx.reshape(-1))
  ds = ds.enumerate().map(
      lambda i, j: normalize(augment(tf.gather(images, j), tf.stack([seed, tf.cast(i, tf.int32)]))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch, drop_remainder=True)


def epoch_stream(train: ImageSet, outliers: Optional[ImageSet], in_idx: np.ndarray,
                 out_idx: np.ndarray, seed: int, epoch: int) -> Iterator[Dict[str, np.ndarray]]:
  """One epoch of augmented ``[in; outlier]`` batches for the indices of
  :func:`energy_jax.train.epoch_indices` (ID batch 128 and outlier batch 256 by default),
  split by ``jax.process_index()`` on multi-host setups."""
  import jax
  steps, batch = in_idx.shape
  host, hosts = jax.process_index(), jax.process_count()
  sl = slice(host * batch // hosts, (host + 1) * batch // hosts)
  ds = _augmented(tf.constant(train.images), in_idx[:, sl], sl.stop - sl.start, seed * 1000 + epoch)
  labels = tf.data.Dataset.from_tensor_slices(train.labels[in_idx[:, sl]])
  parts = {"image": ds, "label": labels}
  if outliers is not None:
    ob = out_idx.shape[1] // hosts
    parts["outlier"] = _augmented(tf.constant(outliers.images), out_idx[:, host * ob:(host + 1) * ob],
                                  ob, seed * 1000 + epoch + 500_000)
  ds = tf.data.Dataset.zip(parts).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def train_stream(train: ImageSet, outliers: Optional[ImageSet] = None, batch_size: int = 128,
                 outlier_batch_size: int = 256, seed: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled, augmented ID (+ outlier) batches, reshuffled each epoch."""
  from energy_jax.train import epoch_indices
  epoch = 0
  while True:
    in_idx, out_idx = epoch_indices(seed, epoch, len(train), batch_size,
                                    len(outliers) if outliers is not None else 0,
                                    outlier_batch_size)
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
