"""TensorFlow Datasets as a source kind: ``tfds:NAME`` (``tfds:cifar10``, ``tfds:svhn_cropped``).

The whole split is decoded into memory as uint8, images brought to the configured size as the
reference's OOD loaders do (Resize on the short side, then CenterCrop) unless they have it.
Needs TensorFlow and tensorflow-datasets.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from energy_jax.data.image_set import ImageSet
from energy_jax.data.sources import register
from energy_jax.tf_support import import_tensorflow


def _builder(name: str, data_dir: Optional[str] = None):
  import_tensorflow()
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
  return builder


def count_tfds(name: str, split: Optional[str] = None) -> int:
  """Examples of ``split`` (default ``test``), from the prepared data set's metadata."""
  return int(_builder(name).info.splits[split or "test"].num_examples)


@register("tfds", count=count_tfds)
def load_tfds_arrays(name: str, split: Optional[str] = None, image_size: int = 32,
                     data_dir: Optional[str] = None) -> ImageSet:
  """A whole TFDS split (default ``test``) as uint8 arrays ``[N, image_size, image_size, 3]``."""
  tf = import_tensorflow()
  import tensorflow_datasets as tfds
  split = split or "test"
  builder = _builder(name, data_dir)
  ds = builder.as_dataset(split=split, as_supervised=False)
  label_key = "label" if "label" in builder.info.features else None
  images, labels = [], []
  to_size = lambda image: _resize_center_crop(tf, image, image_size)
  for ex in tfds.as_numpy(ds.map(lambda e: (to_size(e["image"]),
                                            e[label_key] if label_key else tf.constant(0)),
                                 num_parallel_calls=tf.data.AUTOTUNE).batch(1024)):
    images.append(ex[0])
    labels.append(ex[1])
  names = tuple(builder.info.features[label_key].names) if label_key else ("",)
  return ImageSet(np.concatenate(images).astype(np.uint8),
                  np.concatenate(labels).astype(np.int32), names, f"tfds:{name}:{split}")


def _resize_center_crop(tf, image, size: int):
  """Grayscale to RGB; Resize(size) on the short side + CenterCrop(size) unless already square
  of that size."""
  image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image[..., :3]
  shape = tf.shape(image)
  h, w = shape[0], shape[1]

  def resize():
    short = tf.minimum(h, w)
    new_h = tf.cast(size * h / short, tf.int32)
    new_w = tf.cast(size * w / short, tf.int32)
    r = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
    top, left = (new_h - size + 1) // 2, (new_w - size + 1) // 2
    return tf.cast(tf.round(r[top:top + size, left:left + size]), tf.uint8)
  same = tf.logical_and(tf.equal(h, size), tf.equal(w, size))
  return tf.ensure_shape(tf.cond(same, lambda: tf.cast(image, tf.uint8), resize),
                         (size, size, 3))
