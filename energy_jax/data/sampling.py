"""Which images each training step reads: a function of ``(seed, epoch)`` only, so that a resumed
run draws what it would have drawn, on either input path."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def steps_per_epoch(num_train: int, batch_size: int, source: str = "the training set") -> int:
  """Full batches per epoch (the remainder is dropped); raises if there is none."""
  if num_train < batch_size:
    raise ValueError(f"{source} has {num_train} images, fewer than one batch of {batch_size}")
  return num_train // batch_size


def epoch_indices(seed: int, epoch: int, num_train: int, batch: int, num_out: int,
                  out_batch: int) -> Tuple[np.ndarray, np.ndarray]:
  """Shuffled ID indices ``int32 [steps, batch]`` (remainder dropped) and outlier indices
  ``int32 [steps, out_batch]`` (fresh permutations of the outlier pool, concatenated as needed;
  ``[steps, 0]`` without outliers)."""
  rng = np.random.default_rng([seed, epoch])
  steps = num_train // batch
  in_idx = rng.permutation(num_train)[:steps * batch].reshape(steps, batch)
  if not num_out:
    return in_idx.astype(np.int32), np.zeros((steps, 0), np.int32)
  need = steps * out_batch
  pool = np.concatenate([rng.permutation(num_out) for _ in range(-(-need // num_out))])
  return in_idx.astype(np.int32), pool[:need].reshape(steps, out_batch).astype(np.int32)
