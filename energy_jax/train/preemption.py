"""Preemption: SIGTERM (spot TPU VMs, SLURM, Colab) or SIGINT (Ctrl-C at a terminal, a notebook's
interrupt) asks a run to stop at its next step boundary.

The run then saves a checkpoint where it stopped, mid-epoch if need be, writes nothing else and
returns; the same command resumes there and ends as an uninterrupted run would. A second Ctrl-C
stops at once (Python's KeyboardInterrupt), losing the steps since the last checkpoint. With
several processes, a signal to any of them stops all at the same step (they agree at every
boundary).
"""

from __future__ import annotations

import signal
import sys
import threading

from energy_jax import distributed


class PreemptionWatch:
  """``with PreemptionWatch() as watch:`` ... ``if watch.requested(): save and return``.

  The handlers are installed only in the main thread (where Python delivers signals); elsewhere
  (e.g. a run started from a worker thread) the watch never fires.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._flag = False
    self.signal_name = "SIGTERM"      # what asked; other processes of a run learn only that
    self._previous = {}

  def _handle(self, signum, frame):
    self._flag = True
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      # The next Ctrl-C goes to the handler from before: KeyboardInterrupt, at once.
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
      print("Ctrl-C: stopping at the next step boundary to save there (Ctrl-C again stops at "
            "once, without saving)", file=sys.stderr, flush=True)

  def __enter__(self) -> "PreemptionWatch":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        # A signal the process was started to ignore (SIGINT of a background job `cmd &`) stays
        # ignored.
        if signal.getsignal(sig) is not signal.SIG_IGN:
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self) -> bool:
    """Whether any process was asked to stop (call it at the same boundaries on every process)."""
    return distributed.any_process(self._flag)
