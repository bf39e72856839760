"""The paper's data and the authors' weights by name, downloaded once into a cache.

  python -m energy_jax.fetch list                      # every name, its size, checksum, cached?
  python -m energy_jax.fetch get energy_ood:cifar10_energy_ft energy_ood:lsun_c

A name (``energy_ood:cifar10_energy_ft``, ``energy_ood:lsun_c``, ...) goes wherever a checkpoint
or a data source goes: ``--config.pretrained``, ``--config.outliers``, ``evaluate.py
--checkpoint`` and the paper's OOD sets. :func:`path` is the one place the loaders resolve
names to local files; a checkpoint's ``.pt`` is converted once to an Orbax run folder in the
cache where it is read (:func:`energy_jax.checkpoints.fetched_run`), so that later runs read it
without torch.

The cache is ``~/.cache/energy_jax`` unless ``ENERGY_JAX_CACHE`` or ``--cache_dir`` names another
folder. A download goes to ``downloads/<file>.part``, is resumed from there with an HTTP Range
request after an interruption, and is renamed to ``downloads/<file>`` only once whole and
checked: against the authors' git blob id (the checkpoints), a published MD5 (torchvision's, for
SVHN and DTD), else against the size and SHA-256 recorded in ``manifest.json`` at its first
download. A file that fails its check is moved aside to ``<file>.bad``. Archives are unpacked
once into ``<prefix>/<name>/`` (a temporary folder renamed into place, so a folder there is
whole). ``ENERGY_JAX_FETCH_MIRROR=URL`` fetches every file as ``URL/<file name>`` instead (a
local mirror, the tests' server).

Concurrent calls for one file take turns on ``downloads/<file>.lock`` (flock), the manifest's
updates on ``manifest.json.lock``. A resume sends If-Range with the first response's ETag or
Last-Modified (``<file>.part.validator``) and appends only a 206 whose Content-Range continues
the part. A file without a published checksum must start as its format does before its SHA-256
is recorded (a web page served with 200 is refused, not recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional

from energy_jax import progress

CACHE_ENV = "ENERGY_JAX_CACHE"
MIRROR_ENV = "ENERGY_JAX_FETCH_MIRROR"
DEFAULT_CACHE = os.path.join("~", ".cache", "energy_jax")
PREFIX = "energy_ood"
MANIFEST = "manifest.json"
# Seconds without a byte before a transfer counts as interrupted (then resumed by the next call).
TIMEOUT = 60
CHUNK = 1 << 20
_WEIGHTS = ("https://raw.githubusercontent.com/wetliu/energy_ood/"
            "77f3c09b788bb5a7bfde6fd3671228320ea0949c/CIFAR/snapshots/")


class FetchError(RuntimeError):
  """A download or check that failed: the message names the name, the URL and the fix."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One named download.

  Attributes:
    name: ``energy_ood:NAME``.
    url: where the file is.
    what: one line for ``list``.
    kind: ``checkpoint`` (a ``.pt`` state_dict) or ``images`` (a data source).
    size: bytes, where known in advance.
    checksum: ``(algorithm, hex digest)`` with algorithm ``git-blob`` or ``md5``; None: the size
      and SHA-256 are recorded at the first download and later reads compared against them.
    checksum_from: where ``checksum`` comes from, for ``list``.
    unpack: ``none`` (the file is the source), ``tar`` (a folder of images) or ``svhn_mat``
      (a ``.mat`` whose ``X [32, 32, 3, N]`` becomes a ``.npy [N, 32, 32, 3]``).
    root: the folder inside the unpacked archive that the source reads.
    dataset: the in-distribution set of a checkpoint.
  """
  name: str
  url: str
  what: str
  kind: str = "images"
  size: Optional[int] = None
  checksum: Optional[tuple] = None
  checksum_from: str = "recorded at first download"
  unpack: str = "none"
  root: str = ""
  dataset: str = ""

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[1].split("?", 1)[0]

  @property
  def folder(self) -> str:
    """The folder below the cache of this name's unpacked or converted files."""
    return os.path.join(*self.name.split(":", 1))


ENTRIES: Dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
  """Adds ``entry`` to the registry (its name must be new)."""
  if entry.name in ENTRIES:
    raise ValueError(f"fetch name {entry.name!r} is registered already")
  ENTRIES[entry.name] = entry
  return entry


_BLOBS = {
    ("cifar10", "pretrained"): ("pretrained/cifar10_wrn_pretrained_epoch_99.pt",
                                "694f7a4cc76d585ed9646f7e8bacbe9bb1ed32c2"),
    ("cifar100", "pretrained"): ("pretrained/cifar100_wrn_pretrained_epoch_99.pt",
                                 "e797c0a36b6ac14454c2157fc935c7eee0394767"),
    ("cifar10", "oe_tune"): ("oe_tune/cifar10_wrn_s1_oe_tune_epoch_9.pt",
                             "723c33a194a5446306fea877f8b97de03b96efd5"),
    ("cifar100", "oe_tune"): ("oe_tune/cifar100_wrn_s1_oe_tune_epoch_9.pt",
                              "695ca5eda47b98d84c1ac26bdb759d35cf43a79e"),
    ("cifar10", "energy_ft"): ("energy_ft/cifar10_wrn_s1_energy_ft_epoch_9.pt",
                               "7a9d533d06b0bc7a397bf68027e923c109516d0d"),
    ("cifar100", "energy_ft"): ("energy_ft/cifar100_wrn_s1_energy_ft_epoch_9.pt",
                                "2bb028195a2a5494b07698c07840cdaa51887db8"),
}
_STAGES = {"pretrained": "pretrained 100 epochs (cross-entropy)",
           "oe_tune": "fine-tuned 10 epochs with Outlier Exposure",
           "energy_ft": "fine-tuned 10 epochs with the energy objective"}
for (_dataset, _stage), (_path, _blob) in _BLOBS.items():
  register(Entry(f"{PREFIX}:{_dataset}_{_stage}", _WEIGHTS + _path,
                 f"the authors' WRN-40-2 on {_dataset.upper()}, {_STAGES[_stage]}",
                 kind="checkpoint", checksum=("git-blob", _blob),
                 checksum_from="git blob id (wetliu/energy_ood@77f3c09)", dataset=_dataset))

register(Entry(f"{PREFIX}:textures", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/"
               "dtd-r1.0.1.tar.gz", "Textures (DTD): all 5,640 images in 47 classes",
               checksum=("md5", "fff73e5086ae6bdbea199a49dfb8a4c1"),
               checksum_from="published MD5 (torchvision DTD)", unpack="tar", root="dtd/images"))
register(Entry(f"{PREFIX}:svhn", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
               "SVHN test set: 26,032 32x32 images",
               checksum=("md5", "eb5a983be6a315427106f1b164d9cef3"),
               checksum_from="published MD5 (torchvision SVHN)", unpack="svhn_mat",
               root="test_32x32.npy"))
register(Entry(f"{PREFIX}:places365", "http://data.csail.mit.edu/places/places365/val_256.tar",
               "Places365 validation set: 36,500 256x256 images (official val_256)",
               unpack="tar", root="val_256"))
register(Entry(f"{PREFIX}:lsun_c", "https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz?dl=1",
               "LSUN-C (ODIN release): 10,000 crops", unpack="tar", root="LSUN"))
register(Entry(f"{PREFIX}:lsun_r",
               "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1",
               "LSUN-R (ODIN release): 10,000 32x32 resized images", unpack="tar",
               root="LSUN_resize"))
register(Entry(f"{PREFIX}:isun", "https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz?dl=1",
               "iSUN (ODIN release): 8,925 32x32 images", unpack="tar", root="iSUN"))
register(Entry(f"{PREFIX}:300k_random_images",
               "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy",
               "Outlier Exposure's 300K random images, uint8 [300000, 32, 32, 3] (outliers)"))


def is_name(text) -> bool:
  """Whether ``text`` is a registered name."""
  return isinstance(text, str) and text in ENTRIES


def get(name: str) -> Entry:
  """The entry of ``name``; an unknown name is refused listing the known ones."""
  if name not in ENTRIES:
    raise FetchError(f"unknown fetch name {name!r}; known: {', '.join(ENTRIES)} "
                     "(python -m energy_jax.fetch list)")
  return ENTRIES[name]


def cache_dir(given: Optional[str] = None) -> str:
  """The cache folder: ``given``, else ``$ENERGY_JAX_CACHE``, else ``~/.cache/energy_jax``."""
  return os.path.abspath(os.path.expanduser(given or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def url_of(entry: Entry) -> str:
  """The entry's URL, or its file under ``$ENERGY_JAX_FETCH_MIRROR``."""
  mirror = os.environ.get(MIRROR_ENV)
  return f"{mirror.rstrip('/')}/{entry.filename}" if mirror else entry.url


def log(message: str) -> None:
  print(message, file=sys.stderr)


@contextlib.contextmanager
def _locked(lock_path: str):
  """Holds an exclusive ``flock`` on ``lock_path`` (created if need be, never deleted: a lock
  file removed while another process waits on it would let a third lock a new one beside it).
  flock is per open file, so threads of one process exclude each other too."""
  # os.open, not open(): nothing here goes through a patched or buffered file object.
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)                        # closing the file releases the lock


# ----------------------------------------------------------------------------------------------
# Checks.


def _digests(path: str, blob: bool) -> Dict[str, str]:
  """SHA-256, MD5 and (with ``blob``) the git blob id of the file at ``path``."""
  size = os.path.getsize(path)
  sha256, md5, sha1 = hashlib.sha256(), hashlib.md5(usedforsecurity=False), hashlib.sha1()
  sha1.update(b"blob %d\0" % size)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      sha256.update(block)
      md5.update(block)
      if blob:
        sha1.update(block)
  out = {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "size": size}
  if blob:
    out["git-blob"] = sha1.hexdigest()
  return out


def _read_manifest(root: str) -> Dict[str, dict]:
  try:
    with open(os.path.join(root, MANIFEST)) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except ValueError as e:
    raise FetchError(f"{os.path.join(root, MANIFEST)} is not readable JSON ({e}): delete it to "
                     "record the downloads' checksums afresh") from None


def _write_manifest(root: str, manifest: Dict[str, dict]) -> None:
  # A temporary sibling renamed over the old one: a kill leaves the old manifest or the new.
  target = os.path.join(root, MANIFEST)
  tmp = f"{target}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, target)


# What each format's first bytes are: (file name ending, what it is, offset, accepted starts).
_MAGIC = ((".tar.gz", "a gzip archive", 0, (b"\x1f\x8b",)),
          (".tgz", "a gzip archive", 0, (b"\x1f\x8b",)),
          (".tar", "a tar archive", 257, (b"ustar",)),
          (".npy", "a NumPy .npy file", 0, (b"\x93NUMPY",)),
          (".mat", "a MATLAB .mat file", 0, (b"MATLAB",)),
          # torch.save writes a zip; before torch 1.6, a pickle (protocol 2+ starts with 0x80)
          (".pt", "a PyTorch checkpoint", 0, (b"PK\x03\x04", b"\x80")))


def _format_problem(entry: Entry, part: str) -> Optional[str]:
  """None if the file starts as its format does, else what it is not and how it starts (an HTML
  page served with 200 in place of the file, Dropbox's habit, named as such)."""
  for ending, what, offset, starts in _MAGIC:
    if entry.filename.endswith(ending):
      break
  else:
    return None
  with open(part, "rb") as f:
    head = f.read(max(512, offset + 8))
  if any(head[offset:offset + len(start)] == start for start in starts):
    return None
  shown = head[:15].decode("utf-8", "replace")
  page = head.lstrip()[:1] == b"<"
  return (f"is not {what} (it starts with {shown!r}): "
          + ("the server sent a web page (an error, sign-in or quota page) in its place"
             if page else "the server sent something else in its place"))


def _check(entry: Entry, part: str, url: str, root: str) -> Dict[str, str]:
  """Checks the whole download ``part`` against the entry's checksum or the manifest; a file
  that fails is moved aside to ``<file>.bad`` and refused."""
  found = _digests(part, blob=bool(entry.checksum and entry.checksum[0] == "git-blob"))
  recorded = _read_manifest(root).get(entry.name)
  problem = None
  if entry.size is not None and found["size"] != entry.size:
    problem = f"is {found['size']} bytes, expected {entry.size}"
  elif entry.checksum is not None:
    algorithm, want = entry.checksum
    if found[algorithm] != want:
      problem = (f"has {algorithm} {found[algorithm]} ({found['size']} bytes), expected {want} "
                 f"({entry.checksum_from})")
  else:
    # Before the first download's record is compared or written: a web page served with 200
    # would otherwise be recorded as the file, and every right download refused after it.
    shape = _format_problem(entry, part)
    if shape is not None:
      os.remove(part)
      raise FetchError(f"{entry.name}: the download from {url} {shape}; it was removed and "
                       "nothing was recorded: run the same command again later, or download "
                       "the file in a browser and serve it from a folder with "
                       f"{MIRROR_ENV}=URL")
  if problem is None and entry.checksum is None and recorded is not None and (
      recorded["sha256"], recorded["size"]) != (found["sha256"], found["size"]):
    problem = (f"has SHA-256 {found['sha256']} ({found['size']} bytes), not the "
               f"{recorded['sha256']} ({recorded['size']} bytes) recorded at its first download "
               f"in {os.path.join(root, MANIFEST)}")
  if problem:
    bad = part[:-len(".part")] + ".bad"
    os.replace(part, bad)
    fix = ("run the same command again to download it afresh; if it fails again, the file at "
           "the URL has changed")
    if recorded is not None and entry.checksum is None:
      fix += (f" (if that is expected, remove {entry.name!r} from "
              f"{os.path.join(root, MANIFEST)} to record the new one)")
    raise FetchError(f"{entry.name}: the download from {url} {problem}; moved aside to {bad}: "
                     f"{fix}")
  return found


def _record(entry: Entry, root: str, found: Dict[str, str], url: str, path: str) -> None:
  """Writes the file's size, SHA-256 and modification time to the manifest (the first
  download's for a file without a published checksum: later downloads are compared to it)."""
  # Its own lock: downloads of different names run at once, and a read-modify-write of the
  # manifest by each without one loses the other's entry.
  with _locked(os.path.join(root, MANIFEST + ".lock")):
    manifest = _read_manifest(root)
    manifest[entry.name] = {"file": os.path.relpath(path, root), "url": url,
                            "size": found["size"], "sha256": found["sha256"],
                            "mtime_ns": os.stat(path).st_mtime_ns,
                            "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_manifest(root, manifest)


def _still_whole(entry: Entry, path: str, root: str) -> bool:
  """Whether the cached file is the one checked: same size and time as recorded (cheap), else
  its SHA-256 again (a file changed since is refused and moved aside)."""
  recorded = _read_manifest(root).get(entry.name)
  if recorded is None:
    return False                        # downloaded by no call of this module: checked afresh
  stat = os.stat(path)
  if (stat.st_size, stat.st_mtime_ns) == (recorded["size"], recorded.get("mtime_ns")):
    return True
  found = _digests(path, blob=False)
  if (found["size"], found["sha256"]) == (recorded["size"], recorded["sha256"]):
    return True
  bad = path + ".bad"
  os.replace(path, bad)
  raise FetchError(f"{entry.name}: the cached {path} changed since it was checked (SHA-256 "
                   f"{found['sha256']}, recorded {recorded['sha256']}); moved aside to {bad}: "
                   "run the same command again to download it afresh")


# ----------------------------------------------------------------------------------------------
# Downloads.


def _read_validator(part: str) -> dict:
  try:
    with open(part + ".validator") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_validator(part: str, response, total: Optional[int]) -> None:
  """Keeps beside the part what names the version of the file it holds: the response's strong
  ETag, else its Last-Modified (what If-Range accepts), and the file's whole size."""
  etag = response.headers.get("ETag")
  validator = etag if etag and not etag.startswith("W/") else response.headers.get(
      "Last-Modified")
  try:
    with open(part + ".validator", "w") as f:
      json.dump({"validator": validator, "total": total}, f)
  except OSError:                       # a full disk: the part is then resumed without If-Range
    pass


def _restart(entry: Entry, part: str, why: str) -> None:
  """Drops the part (and its validator): its bytes belong to another version of the file."""
  log(f"{entry.name}: {why}; downloading it from the start")
  for stale in (part, part + ".validator"):
    if os.path.exists(stale):
      os.remove(stale)


def _content_range(header: Optional[str]):
  """``(start, total)`` of a ``Content-Range: bytes a-b/N`` (or ``bytes */N``); None for a
  missing or unreadable header, total None for ``*``."""
  try:
    unit, spec = header.strip().split(" ", 1)
    span, total = spec.split("/", 1)
    start = None if span == "*" else int(span.split("-", 1)[0])
    return unit.lower(), start, None if total.strip() == "*" else int(total)
  except (AttributeError, ValueError):
    return None


def _download(entry: Entry, part: str, url: str) -> None:
  """Appends to ``part`` the bytes of ``url`` it lacks (a Range request when it holds some,
  with If-Range naming the version the part came from), or writes it afresh where the server
  ignores the range, the file changed, or the server's range is not the one asked for."""
  have = os.path.getsize(part) if os.path.exists(part) else 0
  saved = _read_validator(part) if have else {}
  known = saved.get("total") or entry.size
  request = urllib.request.Request(url, headers={"User-Agent": "energy-jax-fetch"})
  if have:
    request.add_header("Range", f"bytes={have}-")
    if saved.get("validator"):
      # A server whose file changed since the part was written answers 200 with the whole new
      # file instead of splicing the new file's tail onto the old one's head.
      request.add_header("If-Range", saved["validator"])
  try:
    response = urllib.request.urlopen(request, timeout=TIMEOUT)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:
      # "Nothing from there": trusted only when the server says the whole file is the part's
      # size (and the size known); else the part is another version's, or longer than the file.
      given = _content_range(e.headers.get("Content-Range"))
      if given is not None and given[2] == have and known in (None, have):
        return
      _restart(entry, part, f"{url} refused the range bytes={have}- (Content-Range "
               f"{e.headers.get('Content-Range')!r}, the part not being a start of its file)")
      return _download(entry, part, url)
    hint = ("the file is not at that address (moved or removed): report it at "
            "https://github.com/wetliu/energy_ood/issues or fetch it from a mirror with "
            f"{MIRROR_ENV}=URL" if e.code in (403, 404, 410) else
            "the server failed; run the same command again later (a download resumes)")
    raise FetchError(f"{entry.name}: HTTP {e.code} {e.reason} from {url}: {hint}") from None
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, "reason", None) or e
    raise FetchError(f"{entry.name}: cannot reach {url} ({reason}): check the network (or a "
                     f"proxy, https_proxy=...), or set {MIRROR_ENV}=URL to a mirror holding "
                     f"{entry.filename}") from None
  if have and response.status == 206:
    # A 206 is appended only when it continues the part exactly: starts at its size, of a file
    # of the size known. Anything else would splice two files (or two places of one).
    given = _content_range(response.headers.get("Content-Range"))
    if (given is None or given[0] != "bytes" or given[1] != have
        or (given[2] is not None and known is not None and given[2] != known)):
      response.close()
      _restart(entry, part, f"{url} answered bytes={have}- with Content-Range "
               f"{response.headers.get('Content-Range')!r}, not the rest of the part")
      return _download(entry, part, url)
  with response:
    resumed = have > 0 and response.status == 206
    if have and not resumed:
      log(f"{entry.name}: {url} ignored the range request (or its file changed since the part "
           "was written); downloading it from the start")
      have = 0
    length = response.headers.get("Content-Length")
    total = have + int(length) if length and length.isdigit() else (entry.size or 0)
    if not resumed:                     # a new part: the version its bytes come from
      _write_validator(part, response, total or None)
    got = have
    bar = progress.bar(total or None, f"fetching {entry.name}", unit="B")
    bar.update(have)
    try:
      with open(part, "ab" if resumed else "wb") as f:
        while True:
          try:
            chunk = response.read(CHUNK)
          except (OSError, http.client.HTTPException) as e:
            raise FetchError(f"{entry.name}: the transfer from {url} broke off after {got} "
                             f"bytes ({type(e).__name__}: {e}); {part} is kept: run the same "
                             "command again to resume") from None
          if not chunk:
            break
          try:
            f.write(chunk)
          except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
              raise FetchError(
                  f"{entry.name}: cannot write {part} ({os.strerror(e.errno)}) after {got} bytes "
                  f"of {url}: free space there, or set {CACHE_ENV} (or --cache_dir) to a disk "
                  "with room; the part is kept and the same command resumes it") from None
            raise
          got += len(chunk)
          bar.update(len(chunk))
    finally:
      bar.close()
  if length and length.isdigit() and got < total:
    raise FetchError(f"{entry.name}: the transfer from {url} broke off after {got} of {total} "
                     f"bytes; {part} is kept: run the same command again to resume")


def download(name: str, cache: Optional[str] = None) -> str:
  """The checked download of ``name`` in the cache (fetched and checked on the first call)."""
  entry = get(name)
  root = cache_dir(cache)
  folder = os.path.join(root, "downloads")
  path = os.path.join(folder, entry.filename)
  os.makedirs(folder, exist_ok=True)
  # One process (or thread) at a time per file, from the look at the cache to the manifest's
  # record: two writers of one .part interleave their bytes, and the second's os.replace finds
  # the part gone. A caller that waited here finds the file the first one finished, recorded.
  with _locked(path + ".lock"):
    if os.path.exists(path) and _still_whole(entry, path, root):
      return path
    url = url_of(entry)
    part = path + ".part"
    if os.path.exists(path):            # a file no call of this module checked: checked now
      os.replace(path, part)
    else:
      _download(entry, part, url)
    try:
      found = _check(entry, part, url, root)
    finally:                            # the part is whole (or moved aside): nothing to resume
      if os.path.exists(part + ".validator"):
        os.remove(part + ".validator")
    os.replace(part, path)
    _record(entry, root, found, url, path)
  return path


# ----------------------------------------------------------------------------------------------
# Unpacking.


def _unpack_tar(archive: str, into: str) -> None:
  with tarfile.open(archive) as tar:
    if hasattr(tarfile, "data_filter"):
      # The "data" filter refuses absolute paths, links out of the folder and device files.
      tar.extractall(into, filter="data")
      return
    # Python < 3.11.4 has no filters: only plain files and folders inside ``into``.
    for member in tar.getmembers():
      parts = member.name.replace("\\", "/").split("/")
      if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
        raise ValueError(f"refusing archive member {member.name!r} (outside the folder, or "
                         "not a plain file)")
    tar.extractall(into)


def move_into_place(tmp: str, target: str) -> None:
  """Renames the finished ``tmp`` to ``target``; where another process got there first, its
  copy is kept."""
  try:
    os.replace(tmp, target)
  except OSError:
    if not os.path.isdir(target):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _unpack_svhn_mat(archive: str, into: str) -> None:
  try:
    from scipy import io as scipy_io
  except ImportError as e:
    raise FetchError("reading SVHN's .mat needs scipy: pip install scipy") from e
  import numpy as np
  mat = scipy_io.loadmat(archive)
  images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)).astype(np.uint8))
  np.save(os.path.join(into, "test_32x32.npy"), images)
  np.save(os.path.join(into, "labels.npy"), mat["y"].reshape(-1).astype(np.int32) % 10)


_UNPACKERS: Dict[str, Callable[[str, str], None]] = {"tar": _unpack_tar,
                                                      "svhn_mat": _unpack_svhn_mat}


def path(name: str, cache: Optional[str] = None) -> str:
  """The local file or folder a data source reads for ``name``: downloaded, checked and
  unpacked once."""
  entry = get(name)
  archive = download(name, cache)
  if entry.unpack == "none":
    return archive
  target = os.path.join(cache_dir(cache), entry.folder)
  if not os.path.isdir(target):
    tmp = f"{target}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"{entry.name}: unpacking {archive}")
    try:
      _UNPACKERS[entry.unpack](archive, tmp)
    except FetchError:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    except Exception as e:             # tarfile, scipy and OSError raise several types
      shutil.rmtree(tmp, ignore_errors=True)
      raise FetchError(f"{entry.name}: cannot unpack {archive} ({type(e).__name__}: {e}): "
                       "free space if the disk is full, else delete the file and run again")
    move_into_place(tmp, target)
  found = os.path.join(target, entry.root)
  if not os.path.exists(found):
    raise FetchError(f"{entry.name}: {archive} unpacked without {entry.root} (found "
                     f"{sorted(os.listdir(target))[:5]}); delete {target} and the archive, and "
                     "run again")
  return found


# ----------------------------------------------------------------------------------------------
# Command line.


def _cached(entry: Entry, root: str) -> str:
  download_path = os.path.join(root, "downloads", entry.filename)
  if entry.kind == "checkpoint" and os.path.isdir(os.path.join(root, entry.folder, "orbax")):
    return "yes (converted)"
  if entry.unpack != "none" and os.path.isdir(os.path.join(root, entry.folder)):
    return "yes (unpacked)"
  if os.path.exists(download_path):
    return "yes"
  if os.path.exists(download_path + ".part"):
    return f"partial ({os.path.getsize(download_path + '.part')} bytes)"
  return "no"


def list_names(cache: Optional[str] = None) -> str:
  """A table of every name: size, where its checksum comes from, whether it is cached."""
  root = cache_dir(cache)
  manifest = _read_manifest(root)
  rows = [("name", "size", "checksum", "cached")]
  for entry in ENTRIES.values():
    size = entry.size or manifest.get(entry.name, {}).get("size")
    rows.append((entry.name, f"{size:,}" if size else "?", entry.checksum_from,
                 _cached(entry, root)))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
  return "\n".join(lines) + f"\ncache: {root}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m energy_jax.fetch", description=__doc__.split(
      "\n")[0])
  parser.add_argument("command", choices=("list", "get"))
  parser.add_argument("names", nargs="*", help="names to get (list shows them)")
  parser.add_argument("--cache_dir", default=None, help=f"default ${CACHE_ENV} or {DEFAULT_CACHE}")
  args = parser.parse_args(argv)
  if args.command == "list":
    print(list_names(args.cache_dir))
    return 0
  if not args.names:
    parser.error("get: name at least one (python -m energy_jax.fetch list shows them)")
  try:
    for name in args.names:
      print(path(name, args.cache_dir))
      if get(name).kind == "checkpoint":
        log(f"{name}: converted to Orbax in the cache where it is first read "
            "(--config.pretrained, evaluate.py --checkpoint), then read without torch")
  except FetchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
