"""Synthetic OOD sets: noise and the reference's validation corruptions.

The reference (``CIFAR/test.py --validate``) tunes hyper-parameters on these,
never on the test OOD sets. They are built here as uint8 images so that they go
through the same normalisation as every other source. The noise sets are the
reference's, mapped back to pixels: uniform noise ``U[-1, 1]`` and Gaussian
noise ``clip(N(0, 0.5^2), -1, 1)`` in *normalised* units, i.e.
``pixel = mean + std * z`` (up to 8-bit rounding). The corruptions transform
images of a base set (the reference uses the other CIFAR's test set).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from energy_jax import fields
from energy_jax.data.augment import MEAN, STD
from energy_jax.data.image_set import ImageSet

_MEAN = np.asarray(MEAN, np.float64)
_STD = np.asarray(STD, np.float64)


def _to_uint8(x01: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x01 * 255.0), 0, 255).astype(np.uint8)


def _other_index(rng: np.random.Generator, n: int) -> np.ndarray:
  """For each i a random j != i, as the reference's pair datasets draw them."""
  j = rng.integers(0, n - 1, size=n)
  return j + (j >= np.arange(n))


def uniform_noise(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """``n`` images of U[-1, 1] noise in normalised units."""
  return _to_uint8(_MEAN + _STD * rng.uniform(-1.0, 1.0, size=(n, size, size, 3)))


def gaussian_noise(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """``n`` images of clip(N(0, 0.5^2), -1, 1) noise in normalised units."""
  z = np.clip(rng.normal(0.0, 0.5, size=(n, size, size, 3)), -1.0, 1.0)
  return _to_uint8(_MEAN + _STD * z)


def arithmetic_mean(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each image averaged with another random one."""
  x = images.astype(np.float64) / 255.0
  return _to_uint8((x + x[_other_index(rng, len(x))]) / 2.0)


def geometric_mean(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``sqrt(x_i * x_j)`` of each image and another random one (0..1 scale)."""
  x = images.astype(np.float64) / 255.0
  return _to_uint8(np.sqrt(x * x[_other_index(rng, len(x))]))


def jigsaw(images: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """The reference's fixed jigsaw: quadrants moved and halves of two swapped (at 32x32: rows
  8..16 above 0..8 of the top-left quadrant, and so on)."""
  x = images
  h, q = x.shape[1] // 2, x.shape[1] // 4
  top_left = np.concatenate([x[:, q:h, :h], x[:, :q, :h]], axis=1)
  top = np.concatenate([top_left, x[:, h:, :h]], axis=2)
  top_right = np.concatenate([x[:, :h, h + q:], x[:, :h, h:h + q]], axis=2)
  bottom = np.concatenate([x[:, h:, h:], top_right], axis=2)
  return np.ascontiguousarray(np.concatenate([top, bottom], axis=1))


def speckle(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Multiplicative noise ``clip(x + x * N(0, 1), 0, 1)``."""
  x = images.astype(np.float64) / 255.0
  return _to_uint8(x + x * rng.standard_normal(x.shape))


def pixelate(images: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """BOX-downsample to 6x6 and back to the image size (PIL), as the reference."""
  from PIL import Image
  out = np.empty_like(images)
  size = images.shape[2], images.shape[1]
  for i, img in enumerate(images):
    small = Image.fromarray(img).resize((6, 6), Image.BOX)
    out[i] = np.asarray(small.resize(size, Image.BOX))
  return out


def rgb_shift(images: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Channels become (G mirrored left-right, B, R)."""
  return np.ascontiguousarray(np.stack(
      [images[:, :, ::-1, 1], images[:, :, :, 2], images[:, :, :, 0]], axis=-1))


def invert(images: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Green and blue inverted, red kept (so the result is OOD with higher probability)."""
  out = images.copy()
  out[..., 1:] = 255 - out[..., 1:]
  return out


NOISE_SETS: Dict[str, Callable[..., np.ndarray]] = {
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise,
}
CORRUPTIONS: Dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "arithmetic_mean": arithmetic_mean,
    "geometric_mean": geometric_mean,
    "jigsaw": jigsaw,
    "speckle": speckle,
    "pixelate": pixelate,
    "rgb_shift": rgb_shift,
    "invert": invert,
}
VALIDATION_SETS = tuple(NOISE_SETS) + tuple(CORRUPTIONS)


def make_ood_set(name: str, num_images: int, seed: int = 0, base: Optional[ImageSet] = None,
                 image_size: int = 32) -> ImageSet:
  """Builds the synthetic OOD set ``name`` (one of ``VALIDATION_SETS``) of ``num_images``.

  Noise sets are ``image_size`` square (the base's size when a base is given); corruptions need
  ``base`` images: the first ``num_images`` of a seeded permutation of ``base`` are transformed.
  ``seed`` lies in ``[0, 2**32)``, as the run's (:func:`energy_jax.fields.check_seed`).
  """
  fields.check_seed(seed, "seed")
  rng = np.random.default_rng(seed)
  if name in NOISE_SETS:
    images = NOISE_SETS[name](num_images, rng, base.image_size if base is not None else image_size)
  elif name in CORRUPTIONS:
    if base is None or len(base) < 2:
      raise ValueError(f"synthetic set {name!r} needs a base image set of at least 2 images")
    picked = base.images[rng.permutation(len(base))[:num_images]]
    images = CORRUPTIONS[name](picked, rng)
  else:
    raise ValueError(f"unknown synthetic OOD set {name!r}; known: {', '.join(VALIDATION_SETS)}")
  return ImageSet(images, np.zeros(len(images), np.int32), ("",), f"synthetic:{name}")
