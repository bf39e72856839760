"""TensorFlow Datasets as a source kind: ``tfds:NAME`` (``tfds:cifar10``, ``tfds:svhn_cropped``).

The whole split is decoded into memory as uint8, images brought to the configured size as the
reference's OOD loaders do (Resize on the short side, then CenterCrop) unless they have it.
Data sets are prepared in ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``;
one that is not is downloaded and prepared on first use, and a failure names its cause (a
missing module, no network, a wrong checksum). Needs ``pip install 'energy_jax[train]'``.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
from typing import List, Optional

import numpy as np

from energy_jax import progress
from energy_jax.data.image_set import ImageSet
from energy_jax.data.sources import PROGRESS_MIN_IMAGES, register, resize_center_crop
from energy_jax.tf_support import INSTALL_HINT, import_tensorflow

# Exceptions (by class name: requests and urllib3 are TFDS's dependencies, not ours) that mean
# the download server could not be reached.
_NETWORK_ERRORS = frozenset({"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
                             "ProxyError", "SSLError", "MaxRetryError", "NameResolutionError",
                             "NewConnectionError"})
_NETWORK_OS_ERRORS = (socket.gaierror, socket.timeout, ConnectionError, urllib.error.URLError)


class TfdsUnavailable(RuntimeError):
  """A TFDS data set is not prepared and could not be; the message names the cause."""


def import_tfds():
  """``tensorflow_datasets`` (TensorFlow imported first, quiet and off the accelerators)."""
  import_tensorflow()
  try:
    import tensorflow_datasets as tfds
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"tfds: sources need tensorflow-datasets, which cannot be imported "
                              f"(missing module {e.name!r}): {INSTALL_HINT}", name=e.name) from e
  return tfds


def _causes(error: BaseException) -> List[BaseException]:
  """``error`` and the exceptions it was raised from or while handling, outermost first."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def explain_failure(name: str, error: BaseException, data_dir: str) -> str:
  """Why preparing the TFDS data set ``name`` into ``data_dir`` failed, in words: a missing
  module, a wrong checksum, an unreachable server, a refused download, or else the error."""
  causes = _causes(error)
  offline = (f"Prepare it once where there is internet (`tfds build {name} --data_dir DIR`) and "
             f"copy DIR to {data_dir} here (or point TFDS_DATA_DIR at it); or pass the images as "
             f"an image folder, .zip or uint8 .npy instead (README: Data)")
  for e in causes:
    if isinstance(e, ModuleNotFoundError):
      return (f"TFDS dataset {name!r} could not be prepared: tensorflow-datasets needs the "
              f"module {e.name!r}, which is not installed ({e}). {INSTALL_HINT} installs it")
  for e in causes:
    if type(e).__name__ == "NonMatchingChecksumError":
      return (f"TFDS dataset {name!r}: a downloaded file has the wrong checksum (a truncated or "
              f"altered download, or a proxy's error page), so it was not used. Delete it from "
              f"{os.path.join(data_dir, 'downloads')} and run again. TFDS said: {e}")
  for e in causes:
    if type(e).__name__ in _NETWORK_ERRORS or isinstance(e, _NETWORK_OS_ERRORS):
      return (f"TFDS dataset {name!r} could not be downloaded: the server cannot be reached (no "
              f"network, or a proxy or firewall in the way): {type(e).__name__}: {e}. {offline}")
  for e in causes:
    if type(e).__name__ == "DownloadError":
      return (f"TFDS dataset {name!r} could not be downloaded: the server refused it: {e}. "
              f"{offline}")
  return (f"TFDS dataset {name!r} could not be prepared in {data_dir}: "
          f"{type(error).__name__}: {error}. {offline}")


def _data_dir(data_dir: Optional[str]) -> Optional[str]:
  """``data_dir``, else $TFDS_DATA_DIR read now (TFDS reads it once, at its import), else
  TFDS's default (``~/tensorflow_datasets``)."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def builder(name: str, data_dir: Optional[str] = None, download_config=None):
  """The prepared TFDS builder of ``name``: downloaded and prepared on first use.

  Raises:
    ValueError: no TFDS data set has that name.
    TfdsUnavailable: it is not prepared and preparing it failed; the message says why.
  """
  tfds = import_tfds()
  if name not in tfds.list_builders():
    raise ValueError(f"unknown TFDS dataset {name!r}")
  b = tfds.builder(name, data_dir=_data_dir(data_dir))
  if not b.is_prepared():
    print(f"TFDS: downloading and preparing {name} into {b.data_dir} (once)", file=sys.stderr)
    try:
      b.download_and_prepare(download_config=download_config)
    except Exception as e:
      raise TfdsUnavailable(explain_failure(name, e, b.data_dir_root)) from e
  return b


def count_tfds(name: str, split: Optional[str] = None) -> int:
  """Examples of ``split`` (default ``test``), from the prepared data set's metadata."""
  return int(builder(name).info.splits[split or "test"].num_examples)


@register("tfds", count=count_tfds)
def load_tfds_arrays(name: str, split: Optional[str] = None, image_size: Optional[int] = 32,
                     data_dir: Optional[str] = None) -> ImageSet:
  """A whole TFDS split (default ``test``; expressions such as ``train+validation+test`` too) as
  uint8 arrays ``[N, image_size, image_size, 3]``, resized as the reference's loaders (PIL
  Resize on the short side + CenterCrop, :func:`energy_jax.data.sources.resize_center_crop`),
  or as they are with ``image_size=None`` (one size for the whole split); a progress bar for
  large splits."""
  tfds = import_tfds()
  split = split or "test"
  b = builder(name, data_dir)
  ds = b.as_dataset(split=split, as_supervised=False)
  label_key = "label" if "label" in b.info.features else None
  try:
    total = int(b.info.splits[split].num_examples)
  except Exception:           # a split expression the metadata cannot count: no bar
    total = 0
  where = f"tfds:{name}:{split}"
  images, labels = [], []
  shown = progress.bar(total, f"decoding {where}", total >= PROGRESS_MIN_IMAGES, unit="img")
  for ex in tfds.as_numpy(ds):
    image = _rgb_at_size(ex["image"], image_size)
    if images and image.shape != images[0].shape:
      raise ValueError(f"{where}: example {len(images)} is {image.shape[1]}x{image.shape[0]}, "
                       f"the first {images[0].shape[1]}x{images[0].shape[0]}: as they are (no "
                       "resize), a set's images must share one size")
    images.append(image)
    labels.append(ex[label_key] if label_key else 0)
    shown.update(1)
  shown.close()
  if not images:
    raise ValueError(f"{where} holds no images")
  names = tuple(b.info.features[label_key].names) if label_key else ("",)
  return ImageSet(np.stack(images), np.asarray(labels, np.int32), names, where)


def _rgb_at_size(image: np.ndarray, size: Optional[int]) -> np.ndarray:
  """``uint8 [H, W, 3]``: grayscale repeated, alpha dropped, then brought to ``size`` (None: kept)."""
  image = np.asarray(image)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3].astype(np.uint8)
  if size is None or image.shape[:2] == (size, size):
    return image
  from PIL import Image
  return resize_center_crop(Image.fromarray(image), size)
