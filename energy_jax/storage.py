"""Where runs, checkpoints and exported detectors live: a local or shared disk, or a Cloud Storage
bucket (``gs://``).

Every such path goes through :mod:`etils.epath`: a local path through ``os``, a ``gs://`` URL
through ``tf.io.gfile`` where TensorFlow is installed, else through fsspec's ``gcsfs``. Orbax
writes checkpoints to a bucket itself (TensorStore's GCS driver) and lists and deletes them
through ``google-cloud-storage``; ``pip install 'energy_jax[gcs]'`` adds both libraries.

Object stores replace whole objects, so :func:`write_text` and :func:`write_bytes` always write
a whole file; on a disk they write a temporary sibling, flush it to the disk and rename it over
the old file, so that a kill leaves the old file or the new one, never a part of either. A
bucket has no folders to rename either: :func:`move_tree` copies, then deletes.
"""

from __future__ import annotations

import importlib
import os
import re
import uuid
from typing import Dict, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# The URL schemes a run may live at: those that both etils.epath and Orbax write to.
URL_SCHEMES = ("gs",)


def is_url(path: PathLike) -> bool:
  """Whether ``path`` is a URL (``scheme://...``) rather than a path on a disk."""
  return "://" in os.fspath(path)


def location(path: PathLike, what: str = "workdir") -> epath.Path:
  """``path`` as an :class:`epath.Path`, made absolute when local. Refused, naming ``what``
  and the path: a URL of a scheme other than :data:`URL_SCHEMES`, a bucket URL without a
  bucket, and a local path that starts like a mistyped URL (``gs:/bucket``)."""
  text = os.fspath(path)
  if not text:
    raise ValueError(f"{what} is empty")
  if not is_url(text) and re.match(r"^(gs|gcs|s3|az|hf|https?|file):", text):
    raise ValueError(f"{what} {text} reads as a URL without its '//' (e.g. "
                     f"{text.split(':', 1)[0]}://BUCKET/PATH); for a local folder of that name "
                     f"write ./{text}")
  if is_url(text):
    scheme = text.split("://", 1)[0]
    if scheme not in URL_SCHEMES:
      raise ValueError(f"{what} {text}: {scheme}:// is not supported; a run lives on a local or "
                       f"shared disk or at {', '.join(s + '://' for s in URL_SCHEMES)}")
    if not text.split("://", 1)[1].strip("/"):
      raise ValueError(f"{what} {text} names no bucket")
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def check_reachable(path: PathLike, what: str = "workdir") -> epath.Path:
  """:func:`location`, and for a URL the libraries it needs and one request to it, so that a
  missing library, missing credentials or no network fail here, naming the path, before any
  work."""
  p = location(path, what)
  if is_url(p):
    require_bucket_client(p, what)
    try:
      p.exists()
    except Exception as e:            # ImportError, auth and network errors of either backend
      raise OSError(f"{what} {p} cannot be reached ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); gs:// paths need TensorFlow "
                    "or gcsfs (pip install 'energy_jax[gcs]'), and credentials (`gcloud auth "
                    "application-default login`, or a TPU VM's service account)") from e
  return p


def require_bucket_client(path: epath.Path, what: str) -> None:
  """Raises, naming ``path``, if ``google-cloud-storage`` (which Orbax lists and deletes a
  bucket's checkpoints with) cannot be imported."""
  try:
    importlib.import_module("google.cloud.storage")
  except ImportError as e:
    raise OSError(f"{what} {path} is in a bucket, where Orbax lists and deletes checkpoints "
                  f"through google-cloud-storage, which cannot be imported ({e}): "
                  "pip install 'energy_jax[gcs]'") from e


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes the whole file ``path`` (its folder is created): atomically on a disk, as one object
  in a bucket."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_url(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str) -> None:
  """:func:`write_bytes` of ``text`` in UTF-8."""
  write_bytes(path, text.encode("utf-8"))


def read_text(path: PathLike) -> str:
  """The whole file ``path``, decoded as UTF-8."""
  return epath.Path(path).read_text(encoding="utf-8")


def move_tree(source: PathLike, target: PathLike) -> None:
  """Moves the folder ``source`` to ``target`` (which must not exist): a rename on a disk; in a
  bucket a copy of every file, then the deletion of ``source``."""
  source, target = epath.Path(source), epath.Path(target)
  if target.exists():
    raise FileExistsError(f"cannot move {source} to {target}: it exists")
  if not is_url(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    return
  for name, path in files_below(source).items():
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    path.copy(target / name)
  source.rmtree()


def files_below(root: PathLike) -> Dict[str, epath.Path]:
  """``{relative path: path}`` of every file below ``root``, with ``/`` separators."""
  root = epath.Path(root)
  out: Dict[str, epath.Path] = {}
  pending = [(root, "")]
  while pending:
    folder, prefix = pending.pop()
    for child in folder.iterdir():
      name = prefix + child.name
      if child.is_dir():
        pending.append((child, name + "/"))
      else:
        out[name] = child
  return out
