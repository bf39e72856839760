"""Image sources decoded into memory as uint8 arrays, without TensorFlow.

A *source* is named by a string:

* ``tfds:NAME`` (``tfds:cifar10``, ``tfds:svhn_cropped``): a TensorFlow Datasets set
  (read through :mod:`energy_jax.input_pipeline`, which needs TensorFlow);
* a folder ``<split>/<class>/<image>`` or ``<class>/<image>`` (classes in sorted
  order, as torchvision's ``ImageFolder``), or images directly in the folder
  (one class);
* a ``.zip`` of such a folder, read in place;
* a ``.npy`` uint8 array ``[N, 32, 32, 3]`` (the Outlier Exposure 300K file), with
  all labels 0.

Images that are not 32x32 are preprocessed as the reference's OOD loaders do:
``Resize(32)`` on the short side (bilinear) then ``CenterCrop(32)``; grayscale
and RGBA become RGB. Nothing is skipped: an unreadable image raises an error
naming it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Decoded images ``uint8 [N, 32, 32, 3]`` with ``int32 [N]`` labels."""
  images: np.ndarray
  labels: np.ndarray
  class_names: Tuple[str, ...]
  source: str

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
      raise ValueError(f"{self.source}: images must be [N, 32, 32, 3], got {self.images.shape}")
    if self.images.dtype != np.uint8:
      raise ValueError(f"{self.source}: images must be uint8, got {self.images.dtype}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"{self.source}: {self.labels.shape[0]} labels for "
                       f"{self.images.shape[0]} images")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    """Number of classes (1 for unlabelled sources)."""
    return len(self.class_names)


def to_32x32_rgb(image) -> np.ndarray:
  """PIL image -> ``uint8 [32, 32, 3]``: RGB, then Resize(32) + CenterCrop(32) if needed."""
  from PIL import Image
  image = image.convert("RGB")
  w, h = image.size
  if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
    # torchvision Resize(int): the short side becomes 32, the long side int(32 * long / short).
    if w <= h:
      size = (IMAGE_SIZE, int(IMAGE_SIZE * h / w))
    else:
      size = (int(IMAGE_SIZE * w / h), IMAGE_SIZE)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    left = int(round((w - IMAGE_SIZE) / 2.0))
    top = int(round((h - IMAGE_SIZE) / 2.0))
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
  return np.asarray(image, dtype=np.uint8)


def _decode(name: str, data: bytes) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return np.asarray(image)       # the common case: no conversion, no resize
      return to_32x32_rgb(image)
  except Exception as e:
    raise ValueError(f"corrupt or unreadable image {name}: {type(e).__name__}: {e}") from e


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


class _Tree:
  """A read-only view of a folder or a zip: relative file names and their bytes."""

  def __init__(self, path: str):
    self.path = path
    if zipfile.is_zipfile(path):
      self._zip = zipfile.ZipFile(path)
      self.files = [i.filename for i in self._zip.infolist() if not i.is_dir()]
      # Zips need not list folders: every ancestor of a member is one.
      self.dirs = {"/".join(n.split("/")[:i]) for n in self._zip.namelist()
                   for i in range(1, n.count("/") + 1)}
    elif os.path.isdir(path):
      self._zip = None
      self.files, self.dirs = [], set()
      for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        self.files += [rel + f for f in files]
        self.dirs |= {rel + d for d in dirs}
    else:
      raise ValueError(f"{path} is neither a folder nor a zip archive")

  def read(self, name: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(name)
    with open(os.path.join(self.path, name), "rb") as f:
      return f.read()


def _list_image_folder(path: str, split: Optional[str]):
  """``(tree, names, labels, class_names)`` of an image folder or zip, without decoding.

  Checks the layout: the split folder exists, every file is an image, one nesting depth,
  no empty class folder.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"image source not found: {path}")
  tree = _Tree(path)
  prefix = ""
  if split:
    prefix = split.strip("/") + "/"
    # A zip may wrap everything in one top folder (``cifar10/train/...``).
    if prefix[:-1] not in tree.dirs:
      tops = {d.split("/")[0] for d in tree.dirs}
      wrapped = [t for t in tops if f"{t}/{prefix[:-1]}" in tree.dirs]
      if len(wrapped) != 1:
        raise FileNotFoundError(f"{path} has no split folder {split!r} "
                                f"(top-level folders: {sorted(tops)[:10]})")
      prefix = f"{wrapped[0]}/{prefix}"
  names = [n for n in tree.files if n.startswith(prefix) and not os.path.basename(n).startswith(".")]
  rel = [n[len(prefix):] for n in names]
  non_images = [n for n, r in zip(names, rel) if not _is_image(r)]
  if non_images:
    raise ValueError(f"{path}: {len(non_images)} file(s) that are not images, e.g. "
                     f"{non_images[:3]} (supported: {', '.join(IMAGE_EXTENSIONS)})")
  if not names:
    raise ValueError(f"{path}{'/' + split if split else ''}: no images found")
  depth = {r.count("/") for r in rel}
  if depth == {0}:                   # images directly in the folder: one class
    class_of = {n: "" for n in names}
  elif depth == {1}:
    class_of = {n: r.split("/")[0] for n, r in zip(names, rel)}
  else:
    raise ValueError(f"{path}: expected <class>/<image> or <image> below "
                     f"{prefix or 'the root'}, found nesting depths {sorted(depth)}")
  class_names = tuple(sorted(set(class_of.values())))
  class_dirs = {d[len(prefix):] for d in tree.dirs if d.startswith(prefix) and d != prefix[:-1]}
  empty = sorted(d for d in class_dirs if "/" not in d and d not in class_names)
  if empty and depth == {1}:
    raise ValueError(f"{path}: class folder(s) without images: {empty}")
  index = {c: i for i, c in enumerate(class_names)}
  names.sort(key=lambda n: (class_of[n], n))
  labels = np.array([index[class_of[n]] for n in names], np.int32)
  return tree, names, labels, class_names


def load_image_folder(path: str, split: Optional[str] = None) -> ImageSet:
  """Decodes an image folder or zip (optionally its ``split`` subfolder) into memory.

  Args:
    path: a folder or ``.zip``.
    split: e.g. ``"train"`` / ``"test"``; when given, ``<path>/<split>/`` is read.

  One thread decodes: for 32x32 JPEGs the per-image cost is Python and PIL call overhead
  (~0.07 ms), which threads only contend for (measured slower with 2 threads), and reopening
  a 60k-entry zip per worker cost more than the decoding itself.
  """
  tree, names, labels, class_names = _list_image_folder(path, split)
  images = np.empty((len(names), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for i, name in enumerate(names):
    images[i] = _decode(f"{path}:{name}", tree.read(name))
  return ImageSet(images, labels, class_names, f"{path}{':' + split if split else ''}")


def _open_npy(path: str) -> np.ndarray:
  """The array of a uint8 ``[N, 32, 32, 3]`` ``.npy`` file, memory-mapped and checked."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f".npy file not found: {path}")
  try:
    images = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:
    raise ValueError(f"cannot read {path} as a .npy array: {e}") from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
    raise ValueError(f"{path}: expected a uint8 array of shape [N, 32, 32, 3], got "
                     f"{images.dtype} {images.shape}")
  if images.shape[0] == 0:
    raise ValueError(f"{path}: the array holds no images")
  return images


def load_npy(path: str) -> ImageSet:
  """Reads a uint8 ``[N, 32, 32, 3]`` array (labels all 0)."""
  images = _open_npy(path)
  return ImageSet(np.ascontiguousarray(images), np.zeros(images.shape[0], np.int32),
                  ("",), path)


def _check_source_name(source) -> None:
  if not isinstance(source, str) or not source:
    raise ValueError(f"a data source must be a non-empty string, got {source!r}")


def load_source(source: str, split: Optional[str] = None) -> ImageSet:
  """Loads any source named as in the module docstring into memory."""
  _check_source_name(source)
  if source.startswith("tfds:"):
    from energy_jax import input_pipeline  # needs TensorFlow
    return input_pipeline.load_tfds_arrays(source[len("tfds:"):], split or "test")
  if source.startswith("synthetic:"):
    raise ValueError(f"{source}: synthetic sets are made by energy_jax.synthetic.make_ood_set")
  if source.endswith(".npy"):
    return load_npy(source)
  return load_image_folder(source, split)


def load_source_cached(cache: Optional[Dict[Tuple[str, Optional[str]], ImageSet]], source: str,
                       split: Optional[str] = None) -> ImageSet:
  """:func:`load_source` through ``cache`` (a dict keyed by ``(source, split)`` that the caller
  keeps, e.g. across the stages of one process), so each source is decoded once."""
  if cache is None:
    return load_source(source, split)
  if (source, split) not in cache:
    cache[(source, split)] = load_source(source, split)
  return cache[(source, split)]


def count_source(source: str, split: Optional[str] = None) -> int:
  """How many images :func:`load_source` would return, read from the listing (a zip's index, a
  folder's files, a ``.npy`` header) without decoding; the layout is checked the same way.
  TFDS sources are not counted here (that needs TensorFlow): the caller loads them instead."""
  _check_source_name(source)
  if source.startswith(("tfds:", "synthetic:")):
    raise ValueError(f"{source}: only image folders, zips and .npy files can be counted "
                     "without loading")
  if source.endswith(".npy"):
    return int(_open_npy(source).shape[0])
  return len(_list_image_folder(source, split)[1])
