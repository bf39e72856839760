"""Where a run's files live: a local or shared disk, or a Cloud Storage bucket (``gs://``).

Every path of a run goes through :mod:`etils.epath`: a local path through ``os``, a ``gs://``
URL through ``tf.io.gfile`` where TensorFlow is installed, else through fsspec's ``gcsfs``
(``pip install gcsfs``). Orbax writes checkpoints to a bucket itself (TensorStore's GCS driver;
deleting old ones there needs ``google-cloud-storage``).

Object stores replace whole objects, so :func:`write_text` and :func:`write_bytes` always write
a whole file; on a disk they write a temporary sibling, flush it to the disk and rename it over
the old file, so that a kill leaves the old file or the new one, never a part of either.
"""

from __future__ import annotations

import os
import uuid
from typing import Dict, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# The URL schemes a run may live at: those that both etils.epath and Orbax write to.
URL_SCHEMES = ("gs",)


def is_url(path: PathLike) -> bool:
  return "://" in os.fspath(path)


def run_path(path: PathLike, what: str = "workdir") -> epath.Path:
  """``path`` as an :class:`epath.Path`, made absolute when local; a URL of a scheme other than
  :data:`URL_SCHEMES` is refused, naming it."""
  text = os.fspath(path)
  if not text:
    raise ValueError(f"{what} is empty")
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
  """:func:`run_path`, and for a URL one request to it, so that a missing backend, missing
  credentials or no network fail here, naming the path, before any work."""
  p = run_path(path, what)
  if is_url(p):
    try:
      p.exists()
    except Exception as e:            # ImportError, auth and network errors of either backend
      raise OSError(f"{what} {p} cannot be reached ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); gs:// paths need TensorFlow "
                    "or `pip install gcsfs`, and credentials (`gcloud auth application-default "
                    "login`, or a TPU VM's service account)") from e
  return p


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
  return epath.Path(path).read_text(encoding="utf-8")


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
