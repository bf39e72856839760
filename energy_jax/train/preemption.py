"""Preemption: SIGTERM (spot TPU VMs, SLURM, Colab) asks a run to stop at its next step boundary.

The run then saves a checkpoint where it stopped, mid-epoch if need be, writes nothing else and
returns; the same command resumes there and ends as an uninterrupted run would. With several
processes, a signal to any of them stops all at the same step (they agree at every boundary).
"""

from __future__ import annotations

import signal
import threading

from energy_jax import distributed


class PreemptionWatch:
  """``with PreemptionWatch() as watch:`` ... ``if watch.requested(): save and return``.

  The handler is installed only in the main thread (where Python delivers signals); elsewhere
  (e.g. a run started from a worker thread) the watch never fires.
  """

  SIGNALS = (signal.SIGTERM,)

  def __init__(self):
    self._flag = False
    self._previous = {}

  def _handle(self, signum, frame):
    self._flag = True

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self) -> bool:
    """Whether any process was asked to stop (call it at the same boundaries on every process)."""
    return distributed.any_process(self._flag)
