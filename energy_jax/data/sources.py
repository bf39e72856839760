"""Image sources by name: a registry of source kinds, each able to load and to count.

A source is a string:

* ``KIND:LOCATION`` for a registered kind with a prefix, e.g. ``tfds:cifar10``
  (:mod:`energy_jax.data.tfds_source`), or ``energy_ood:lsun_c``: a set of
  :mod:`energy_jax.fetch`, downloaded once into its cache and read as the path it unpacks to;
* a path otherwise: a ``.npy`` uint8 array ``[N, H, W, 3]`` (the Outlier Exposure 300K file),
  labels all 0; or a folder ``<split>/<class>/<image>`` or ``<class>/<image>`` (classes in
  sorted order, as torchvision's ``ImageFolder``) or images directly in the folder (one class),
  or a ``.zip`` of such a folder, read in place.

Images are brought to ``image_size`` x ``image_size`` RGB as the reference's OOD loaders do
(``Resize(size)`` on the short side, bilinear, then ``CenterCrop(size)``; grayscale, palette and
RGBA become RGB, alpha dropped, as PIL's ``convert("RGB")``) unless they have that size already.
Samples of 16 bits (PNG, TIFF, PGM/PPM) become 8 bits as ``round(v / 257)``, the 8-bit value
nearest ``v / 65535``: ``convert("RGB")`` would clip 16-bit grayscale at 255 (white) and keep
only the high byte of 16-bit colour. Pixels without a defined range (32-bit integers or floats,
as TIFF can hold) are refused. Nothing is skipped: an unreadable image raises an error naming it.

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


def join_data_dir(data_dir: str, source: str) -> str:
  """``source`` as read from ``data_dir``: a relative path joined to it; prefixed sources
  (``tfds:...``) and absolute paths as they are."""
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
  image = to_rgb(image)
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


class UnsupportedImageError(ValueError):
  """A readable image whose pixels cannot be brought to 8-bit RGB without guessing."""


# PIL's modes of one 16-bit sample per pixel.
GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# PIL decodes 16-bit colour to 8 bits through the rawmode of each tile, keeping the high byte of
# every sample. A second decode through another rawmode of the same bits per pixel (so that the
# PNG row filters undo the same way) reads the low bytes: the rawmode, and the channel of its
# output that holds the low byte of R, G and B. (16-bit LA opens as RGBA with R = G = B = L.)
_LOW_BYTES = {"RGB;16B": ("RGB;16L", (0, 1, 2)), "RGB;16L": ("RGB;16B", (0, 1, 2)),
              "RGBA;16B": ("RGBA;16L", (0, 1, 2)), "RGBA;16L": ("RGBA;16B", (0, 1, 2)),
              "LA;16B": ("RGBA", (1, 1, 1))}


def to_8_bits(samples: np.ndarray) -> np.ndarray:
  """16-bit samples (0 .. 65535) -> uint8 ``round(v / 257)``, the nearest 8-bit value of the
  same fraction of full scale (``v / 257`` is never halfway between two integers)."""
  return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _rawmode(tile) -> Optional[str]:
  args = tile[3]
  return args if isinstance(args, str) else (
      args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else None)


def _with_rawmode(tile, rawmode: str):
  args = tile[3]
  args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
  return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _wide_rawmode(image) -> Optional[str]:
  """The 16-bit colour rawmode (of :data:`_LOW_BYTES`) ``image``'s tiles decode through, before
  ``load``; None for any other image."""
  modes = {_rawmode(t) for t in getattr(image, "tile", None) or ()}
  return modes.pop() if len(modes) == 1 and modes <= set(_LOW_BYTES) else None


def _decode_16_bit_colour(data: bytes, rawmode: str, high: np.ndarray):
  """8-bit RGB of a 16-bit colour image whose high bytes PIL decoded as ``high``."""
  from PIL import Image
  low_rawmode, channels = _LOW_BYTES[rawmode]
  with Image.open(io.BytesIO(data)) as image:
    image.tile = [_with_rawmode(t, low_rawmode) for t in image.tile]
    image.load()
    low = np.asarray(image)[..., list(channels)]
  samples = high[..., :3].astype(np.uint16) * 256 + low
  return Image.fromarray(to_8_bits(samples), "RGB")


def to_rgb(image, data: Optional[bytes] = None, wide_rawmode: Optional[str] = None):
  """A loaded PIL image as 8-bit RGB: 16-bit samples as ``round(v / 257)`` (see the module
  docstring), every other mode through ``convert("RGB")``. ``data`` and ``wide_rawmode`` (from
  :func:`_wide_rawmode` before ``load``) let a 16-bit colour image be decoded again for its low
  bytes; without them its 8 bits are PIL's high bytes (at most one level below)."""
  from PIL import Image
  mode = image.mode
  # PIL opens 16-bit PGM (scaled to 16 bits from its maxval), and 16-bit grayscale PNG in older
  # versions, as 32-bit integers.
  if mode in GRAY16_MODES or (mode == "I" and image.format in ("PNG", "PPM")):
    samples = np.asarray(image)
    if samples.size and (samples.min() < 0 or samples.max() > 65535):
      raise UnsupportedImageError(f"{image.format} {mode} pixels span [{samples.min()}, "
                                  f"{samples.max()}], beyond 16 bits")
    return Image.fromarray(np.repeat(to_8_bits(samples)[..., None], 3, axis=-1), "RGB")
  if mode in ("I", "F"):
    kind = "32-bit integer" if mode == "I" else "32-bit floating-point"
    raise UnsupportedImageError(f"{kind} pixels (PIL mode {mode}, {image.format}) have no defined "
                                "range to bring to 8 bits: save the image with 8 or 16 bits per "
                                "sample")
  if wide_rawmode is not None and data is not None:
    return _decode_16_bit_colour(data, wide_rawmode, np.asarray(image))
  return image.convert("RGB")


def _decode(name: str, data: bytes, size: Optional[int]) -> np.ndarray:
  """RGB ``uint8 [size, size, 3]``, or the image's own size when ``size`` is None."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as image:
      wide = _wide_rawmode(image)
      image.load()
      if (image.mode == "RGB" and wide is None
          and (size is None or image.size == (size, size))):
        return np.asarray(image)       # the common case: no conversion, no resize
      image = to_rgb(image, data, wide)
      if size is None:
        return np.asarray(image, dtype=np.uint8)
      return resize_center_crop(image, size)
  except UnsupportedImageError as e:
    raise UnsupportedImageError(f"{name}: {e}") from None
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




# ----------------------------------------------------------------------------------------------
# The named downloads of energy_jax.fetch: downloaded once, then read as the path they unpack to.


def _fetched(location: str) -> str:
  from energy_jax import fetch
  return fetch.path(f"{fetch.PREFIX}:{location}")


@register("energy_ood", count=lambda location, split: count(_fetched(location), split))
def load_fetched(location: str, split: Optional[str] = None,
                 image_size: Optional[int] = 32) -> ImageSet:
  """``energy_ood:NAME`` (``python -m energy_jax.fetch list``), fetched on first use."""
  return load(_fetched(location), split, image_size)
