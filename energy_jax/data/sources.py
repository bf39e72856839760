"""Image sources by name: a registry of source kinds, each able to load and to count.

A source is a string:

* ``KIND:LOCATION`` for a registered kind with a prefix, e.g. ``tfds:cifar10``
  (:mod:`energy_jax.data.tfds_source`);
* a path otherwise: a ``.npy`` uint8 array ``[N, H, W, 3]`` (the Outlier Exposure 300K file),
  labels all 0; or a folder ``<split>/<class>/<image>`` or ``<class>/<image>`` (classes in
  sorted order, as torchvision's ``ImageFolder``) or images directly in the folder (one class),
  or a ``.zip`` of such a folder, read in place.

Images are brought to ``image_size`` x ``image_size`` RGB as the reference's OOD loaders do
(``Resize(size)`` on the short side, bilinear, then ``CenterCrop(size)``; grayscale and RGBA
become RGB) unless they have that size already. Nothing is skipped: an unreadable image raises an
error naming it.

A new kind is one file: ``@sources.register("hf", count=...)`` on its
``load(location, split, image_size) -> ImageSet``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from energy_jax import progress
from energy_jax.data.image_set import ImageSet
from energy_jax.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Decoding shows a progress bar from this many images on (CIFAR-10's test set: ~1 s).
PROGRESS_MIN_IMAGES = 5000


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """A kind of source.

  Attributes:
    load: ``load(location, split, image_size) -> ImageSet``.
    count: ``count(location, split) -> int`` without decoding, or None if it must load.
    claims: for path-like kinds without a prefix, ``claims(source)`` says whether the source is
      theirs (the newest registration is asked first; the built-in ``folder`` kind claims every
      path no other kind took); None for ``KIND:`` prefixed kinds.
  """
  load: Callable[[str, Optional[str], int], ImageSet]
  count: Optional[Callable[[str, Optional[str]], int]] = None
  claims: Optional[Callable[[str], bool]] = None


SOURCES: Registry[SourceKind] = Registry("data source kind")


def register(name: str, *, count: Optional[Callable] = None,
             claims: Optional[Callable[[str], bool]] = None, replace: bool = False):
  """Decorator registering ``load`` as the source kind ``name`` (``name:LOCATION`` sources unless
  ``claims`` is given, see :class:`SourceKind`)."""
  def add(load):
    SOURCES.register(name, replace=replace)(SourceKind(load, count, claims))
    return load
  return add


def resolve(source: str) -> Tuple[str, str]:
  """``(kind, location)`` of ``source``."""
  if not isinstance(source, str) or not source:
    raise ValueError(f"a data source must be a non-empty string, got {source!r}")
  prefix, sep, rest = source.partition(":")
  if sep and prefix in SOURCES and SOURCES.get(prefix).claims is None:
    return prefix, rest
  for name in reversed(SOURCES.names()):     # the newest claim first: "folder" takes the rest
    kind = SOURCES.get(name)
    if kind.claims is not None and kind.claims(source):
      return name, source
  raise ValueError(f"no data source kind reads {source!r}; kinds: {', '.join(SOURCES.names())}")


def under(data_dir: str, source: str) -> str:
  """``source`` read from ``data_dir``: a relative path is joined to it; prefixed sources
  (``tfds:...``) and absolute paths are left as they are."""
  if not data_dir or not source:
    return source
  kind, _ = resolve(source)
  if SOURCES.get(kind).claims is None or os.path.isabs(source):
    return source
  return os.path.join(data_dir, source)


def load(source: str, split: Optional[str] = None, image_size: Optional[int] = 32) -> ImageSet:
  """Decodes ``source`` (its ``split``, where it has splits) into memory, its images brought to
  ``image_size`` square (None: as they are, one size for the set)."""
  kind, location = resolve(source)
  return SOURCES.get(kind).load(location, split, image_size)


def count(source: str, split: Optional[str] = None) -> int:
  """How many images :func:`load` would return; from a listing where the kind can (a zip's
  index, a folder's files, a ``.npy`` header), else by loading."""
  kind, location = resolve(source)
  entry = SOURCES.get(kind)
  if entry.count is None:
    return len(entry.load(location, split, 32))
  return entry.count(location, split)


def load_cached(cache: Optional[Dict[Tuple[str, Optional[str], int], ImageSet]], source: str,
                split: Optional[str] = None, image_size: int = 32) -> ImageSet:
  """:func:`load` through ``cache``, a dict the caller keeps (e.g. across the stages of one
  process), so that each source is decoded once."""
  if cache is None:
    return load(source, split, image_size)
  key = (source, split, image_size)
  if key not in cache:
    cache[key] = load(source, split, image_size)
  return cache[key]


# ----------------------------------------------------------------------------------------------
# Image folders and zips.


def resize_center_crop(image, size: int) -> np.ndarray:
  """PIL image -> ``uint8 [size, size, 3]``: RGB, then Resize(size) + CenterCrop(size) if needed."""
  from PIL import Image
  image = image.convert("RGB")
  w, h = image.size
  if (w, h) != (size, size):
    # torchvision Resize(int): the short side becomes size, the long side int(size * long / short).
    if w <= h:
      new = (size, int(size * h / w))
    else:
      new = (int(size * w / h), size)
    image = image.resize(new, Image.BILINEAR)
    w, h = image.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, dtype=np.uint8)


def _decode(name: str, data: bytes, size: Optional[int]) -> np.ndarray:
  """RGB ``uint8 [size, size, 3]``, or the image's own size when ``size`` is None."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == "RGB" and (size is None or image.size == (size, size)):
        return np.asarray(image)       # the common case: no conversion, no resize
      if size is None:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
      return resize_center_crop(image, size)
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


def count_image_folder(path: str, split: Optional[str] = None) -> int:
  """Images of a folder or zip (its ``split``), from the listing."""
  return len(_list_image_folder(path, split)[1])


def _is_path(source: str) -> bool:
  return True


@register("folder", count=count_image_folder, claims=_is_path)
def load_image_folder(path: str, split: Optional[str] = None,
                      image_size: Optional[int] = 32) -> ImageSet:
  """Decodes an image folder or zip (optionally its ``split`` subfolder) into memory, brought to
  ``image_size`` (None: as they are, which must then be one size, as the reference feeds
  LSUN-C, LSUN-R and iSUN).

  One thread decodes: for 32x32 JPEGs the per-image cost is Python and PIL call overhead
  (~0.07 ms), which threads only contend for (measured slower with 2 threads), and reopening
  a 60k-entry zip per worker cost more than the decoding itself.
  """
  tree, names, labels, class_names = _list_image_folder(path, split)
  images = None
  if image_size is not None:
    images = np.empty((len(names), image_size, image_size, 3), np.uint8)
  where = os.path.basename(path) + (f":{split}" if split else "")
  shown = progress.bar(len(names), f"decoding {where}", len(names) >= PROGRESS_MIN_IMAGES,
                       unit="img")
  for i, name in enumerate(names):
    image = _decode(f"{path}:{name}", tree.read(name), image_size)
    if images is None:
      images = np.empty((len(names), *image.shape), np.uint8)
    if image.shape != images.shape[1:]:
      raise ValueError(f"{path}:{name} is {image.shape[1]}x{image.shape[0]}, the images before it "
                       f"{images.shape[2]}x{images.shape[1]}: as they are (no resize), a set's "
                       "images must share one size")
    images[i] = image
    if i % 1000 == 999:
      shown.update(1000)
  shown.close()
  return ImageSet(images, labels, class_names, f"{path}{':' + split if split else ''}")


# ----------------------------------------------------------------------------------------------
# .npy arrays.


def _open_npy(path: str) -> np.ndarray:
  """The array of a uint8 ``[N, H, W, 3]`` ``.npy`` file, memory-mapped and checked."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f".npy file not found: {path}")
  try:
    images = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:
    raise ValueError(f"cannot read {path} as a .npy array: {e}") from e
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{path}: expected a uint8 array of shape [N, H, W, 3], got "
                     f"{images.dtype} {images.shape}")
  if images.shape[0] == 0:
    raise ValueError(f"{path}: the array holds no images")
  return images


def count_npy(path: str, split: Optional[str] = None) -> int:
  """Images in a ``.npy`` file, from its header."""
  return int(_open_npy(path).shape[0])


def _is_npy(source: str) -> bool:
  return source.endswith(".npy")


@register("npy", count=count_npy, claims=_is_npy)
def load_npy(path: str, split: Optional[str] = None, image_size: int = 32) -> ImageSet:
  """Reads a uint8 ``[N, image_size, image_size, 3]`` array (labels all 0)."""
  images = _open_npy(path)
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    raise ValueError(f"{path}: expected a uint8 array of shape [N, {image_size}, {image_size}, 3],"
                     f" got {images.dtype} {images.shape}")
  return ImageSet(np.ascontiguousarray(images), np.zeros(images.shape[0], np.int32), ("",), path)


