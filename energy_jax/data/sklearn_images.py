"""Real images that ship with scikit-learn, as the source kind ``sklearn:NAME`` (no download):

* ``sklearn:digits``: the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (UCI
  optical recognition set, 8x8, 17 grey levels), scaled to 0..255 and brought to
  ``image_size`` (bilinear) as RGB; 10 classes. Split ``train`` (1,343 images) or ``test``
  (the default, 454): every fourth image of each class, in the data set's order, is a test
  image.
* ``sklearn:photos``: square patches of the two photographs of
  ``sklearn.datasets.load_sample_images`` (``china.jpg`` and ``flower.jpg``, 427x640), each
  patch 24 to 128 pixels wide at a random place, brought to ``image_size``; one class. Split
  ``train`` (2,000 patches, from the left half of each photograph: auxiliary outliers) or
  ``test`` (the default, 1,000 patches from the right half: an OOD test set that shares no
  pixel with the outliers).

Everything is generated with fixed seeds: the same images on every call.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from energy_jax.data.image_set import ImageSet
from energy_jax.data.sources import register

DIGITS_SPLITS = ("train", "test")
PHOTO_PATCHES = {"train": 2000, "test": 1000}
PATCH_SIZES = (24, 128)


def _split_or_raise(location: str, split: Optional[str], splits, default: Optional[str]):
  split = split or default
  if split not in splits:
    raise ValueError(f"sklearn:{location} has the splits {list(splits)}, not {split!r}")
  return split


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``[N, H, W]`` or ``[N, H, W, 3]`` -> uint8 RGB ``[N, size, size, 3]`` (PIL bilinear)."""
  from PIL import Image
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, img in enumerate(images):
    pil = Image.fromarray(img)
    if pil.size != (size, size):
      pil = pil.resize((size, size), Image.BILINEAR)
    out[i] = np.asarray(pil.convert("RGB"))
  return out


def _digits_test_mask(labels: np.ndarray) -> np.ndarray:
  """Every fourth image of each class (in the data set's order) is a test image."""
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    mask[np.flatnonzero(labels == c)[::4]] = True
  return mask


def _digits(split: str, image_size: int) -> ImageSet:
  from sklearn.datasets import load_digits
  d = load_digits()
  labels = d.target.astype(np.int32)
  keep = _digits_test_mask(labels) == (split == "test")
  grey = np.round(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)   # 0..16 -> 0..255
  return ImageSet(_resize(grey, image_size), labels[keep], tuple(str(c) for c in range(10)),
                  f"sklearn:digits:{split}")


def patch_boxes(split: str, shapes, num: int):
  """``num`` patches ``(photo, top, left, side)`` of photographs of ``shapes`` (``(h, w)``
  each, taken in turn): in the left half of each for ``train``, the right half for ``test``."""
  rng = np.random.default_rng({"train": 0, "test": 1}[split])
  boxes = []
  for i in range(num):
    h, w = shapes[i % len(shapes)]
    half = w // 2
    side = int(rng.integers(PATCH_SIZES[0], min(PATCH_SIZES[1], h, half) + 1))
    top = int(rng.integers(0, h - side + 1))
    left = (0 if split == "train" else w - half) + int(rng.integers(0, half - side + 1))
    boxes.append((i % len(shapes), top, left, side))
  return boxes


def photo_patches(split: str, image_size: int, num: Optional[int] = None) -> np.ndarray:
  """``num`` (default ``PHOTO_PATCHES[split]``) uint8 patches of the sample photographs at
  :func:`patch_boxes`, brought to ``image_size``."""
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  boxes = patch_boxes(split, [p.shape[:2] for p in photos],
                      PHOTO_PATCHES[split] if num is None else num)
  return np.concatenate([_resize(photos[p][None, top:top + side, left:left + side], image_size)
                         for p, top, left, side in boxes])


def count_sklearn(location: str, split: Optional[str] = None) -> int:
  """Images of ``sklearn:digits`` or ``sklearn:photos`` (one split), without making them."""
  if location == "digits":
    split = _split_or_raise(location, split, DIGITS_SPLITS, "test")
    from sklearn.datasets import load_digits
    test = int(_digits_test_mask(load_digits().target).sum())
    return test if split == "test" else 1797 - test
  if location == "photos":
    return PHOTO_PATCHES[_split_or_raise(location, split, PHOTO_PATCHES, "test")]
  raise ValueError(f"unknown scikit-learn image set sklearn:{location}; known: sklearn:digits, "
                   f"sklearn:photos")


@register("sklearn", count=count_sklearn)
def load_sklearn(location: str, split: Optional[str] = None, image_size: int = 32) -> ImageSet:
  """``sklearn:digits`` (split ``train`` / ``test``, the default) or ``sklearn:photos`` (``train`` /
  ``test``, the default) as uint8 RGB ``[N, image_size, image_size, 3]``."""
  if location == "digits":
    return _digits(_split_or_raise(location, split, DIGITS_SPLITS, "test"), image_size)
  if location == "photos":
    split = _split_or_raise(location, split, PHOTO_PATCHES, "test")
    images = photo_patches(split, image_size)
    return ImageSet(images, np.zeros(len(images), np.int32), ("",), f"sklearn:photos:{split}")
  raise ValueError(f"unknown scikit-learn image set sklearn:{location}; known: sklearn:digits, "
                   f"sklearn:photos")
