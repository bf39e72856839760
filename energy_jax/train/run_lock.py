"""One live run per workdir: an exclusive ``fcntl.flock`` on the workdir folder itself, held on a
file descriptor the run keeps open.

A second run on the same workdir is refused, naming the process that holds it (written to
``<workdir>/.lock`` for that purpose only: deleting the file frees nothing); the lock goes with
the process, so a killed run leaves nothing stale. On a file system that cannot lock a folder
(NFS emulates flock with byte-range locks) the lock is on ``.lock`` itself, kept open for
writing and never deleted. The lock belongs to the run: in a
multi-process run process 0 holds it and the others learn at a barrier whether it did.

A bucket (``gs://``) has no file locks: a run there takes none and says so, and keeping to one
run per bucket workdir is up to whoever starts them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from typing import Callable, Optional

from energy_jax import distributed, storage

LOCK = ".lock"


class RunInProgress(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` the body runs as the workdir's only run."""

  def __init__(self, workdir, log: Callable[[str], None] = print):
    self.workdir = storage.location(workdir)
    self.in_bucket = storage.is_url(self.workdir)
    self.path = os.fspath(self.workdir / LOCK)
    self.log = log
    self._fd = None
    self._on_file = False         # True where the folder cannot be locked (NFS): see _take

  def __enter__(self) -> "WorkdirLock":
    if self.in_bucket:
      self.log(f"note: {self.workdir} is in a bucket, which has no file locks: no lock is taken, "
               "so make sure no other run uses this workdir")
      return self
    problem = ""
    if distributed.is_main_process():
      problem = self._take()
    if distributed.any_process(bool(problem)):
      raise RunInProgress(problem or f"process 0 could not lock {self.workdir}")
    return self

  def _take(self) -> str:
    """Takes the lock; '' if it did, else why not."""
    workdir = os.fspath(self.workdir)
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      return f"could not open the workdir {workdir} to lock it: {e.strerror or e}"
    problem = self._flock(fd, workdir)
    if problem is None:
      # NFS emulates flock with byte-range locks, which a directory cannot take: the lock goes on
      # the file .lock instead, opened for writing and never deleted (a deleted lock file would
      # let the next run lock a new one beside a live run).
      os.close(fd)
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        return f"could not open the workdir lock {self.path}: {e.strerror or e}"
      self._on_file = True
      problem = self._flock(fd, self.path) or ""
    if problem:
      return problem
    self._fd = fd
    try:
      text = (f"pid {os.getpid()} on {socket.gethostname()}, since "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
      if self._on_file:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
      else:
        storage.write_text(self.path, text)
    except OSError:               # the holder's name is for messages only
      pass
    return ""

  def _flock(self, fd: int, what: str) -> Optional[str]:
    """'' if ``fd`` is now locked; else why not (and ``fd`` closed); None where this file system
    cannot lock ``fd``'s kind of file but may lock a regular file (a directory on NFS)."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return ""
    except BlockingIOError:
      os.close(fd)
      return (f"{os.fspath(self.workdir)} is in use by a live run "
              f"({self._holder() or 'another process'}); wait for it to end, or choose another "
              "--workdir")
    except OSError as e:
      if not self._on_file and e.errno in (errno.EBADF, errno.EINVAL, errno.ENOLCK,
                                            errno.EOPNOTSUPP):
        return None
      os.close(fd)    # e.g. ENOLCK: a network file system without locking
      return (f"could not lock {what} ({e.strerror or e}): the workdir's file system offers no "
              "file locks; use a local or lock-capable shared disk")

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        return f.read(512).strip()
    except OSError:
      return ""

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      try:
        if self._on_file:
          os.ftruncate(self._fd, 0)         # no holder named after the run
        else:
          os.remove(self.path)
      except OSError:
        pass
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
