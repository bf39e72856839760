"""One run over every process's devices: JAX's own multi-process runtime (``jax.distributed``).

Each process runs the same program on the same config; the mesh spans the devices of all
processes (:func:`energy_jax.parallel.make_mesh`), every process holds the data sets and draws
the same indices, and process 0 alone writes logs, tables and plots (Orbax coordinates the
checkpoints). On a TPU pod slice or under SLURM, ``initialize(auto=True)`` lets JAX find the
coordinator; elsewhere name it: ``initialize("10.0.0.1:1234", num_processes=2, process_id=0)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False,
               timeout_s: int = 300) -> None:
  """Joins the processes of one run; nothing to do for a single process (no address, no
  ``auto``). Must run before anything touches a device."""
  if not coordinator_address and not auto:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(f"num_processes={num_processes}, process_id={process_id} need a "
                       "coordinator address (or auto=True on a TPU pod slice / SLURM)")
    return
  if not auto:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id too")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id}")
  # CPU processes exchange collectives through gloo (XLA:CPU has no other cross-process path);
  # the setting is ignored on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)


def is_main_process() -> bool:
  """Whether this process writes the run's files and prints its log (process 0)."""
  return jax.process_index() == 0


def main_process_only(log: Callable[[str], None]) -> Callable[[str], None]:
  """``log`` on process 0, a no-op on the others."""
  return log if is_main_process() else (lambda message: None)


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_main_process(values: np.ndarray) -> np.ndarray:
  """Process 0's ``values`` on every process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(values))
