"""Fixed-shape batches: a jitted function is applied to every ``batch_size`` rows of some arrays,
the last batch padded (by repeating its last row) so that one compiled program serves a whole
set, and the padding dropped. :func:`batch_bounds` is also the batching of
:func:`energy_jax.inference.predict`, which pads for the devices instead."""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import jax
import numpy as np


def batch_bounds(num: int, batch_size: int) -> Iterator[Tuple[int, int]]:
  """``(start, stop)`` pairs covering ``range(num)``."""
  for start in range(0, num, batch_size):
    yield start, min(start + batch_size, num)


def pad_rows(x, rows: int):
  """``x`` with its last row repeated up to ``rows`` rows."""
  missing = rows - x.shape[0]
  if missing <= 0:
    return x
  return np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], missing, axis=0)])


def map_batches(fn: Callable, tree, batch_size: int, *, num: int = None,
                on_batch: Callable[[int], None] = None) -> np.ndarray:
  """``fn(batch_tree)`` for every ``batch_size`` rows of each leaf of ``tree`` (all leaves share
  their first axis), concatenated as numpy; ``on_batch(rows)`` after each (progress)."""
  leaves = jax.tree_util.tree_leaves(tree)
  num = leaves[0].shape[0] if num is None else num
  parts = []
  for start, stop in batch_bounds(num, batch_size):
    rows = batch_size if num > batch_size else stop - start
    batch = jax.tree_util.tree_map(lambda a: pad_rows(a[start:stop], rows), tree)
    parts.append(np.asarray(fn(batch))[:stop - start])
    if on_batch is not None:
      on_batch(stop - start)
  return np.concatenate(parts) if parts else np.zeros((0,), np.float32)
