"""Which images each training step reads: a function of ``(seed, epoch)`` only, so that a resumed
run draws what it would have drawn, on either input path.

As the reference: the in-distribution set is reshuffled each epoch and its last partial batch is
kept (``drop_remainder=False``: 50,000 images at batch 128 give 391 steps, the last with 80
images), and the outliers are read as a contiguous window from a random offset each epoch,
unshuffled (``outlier_sampling="window"``: the reference sets ``dataset.offset`` to a random index
each epoch and reads it with ``shuffle=False``, wrapping around the end).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

OUTLIER_SAMPLING = ("window", "shuffle")
PAD = -1          # the index of a padding slot in the last partial batch


def steps_per_epoch(num_train: int, batch_size: int, drop_remainder: bool = False,
                    source: str = "the training set") -> int:
  """Steps per epoch: ``ceil(num_train / batch)``, or full batches only with
  ``drop_remainder``; raises if there is no full batch to drop to."""
  if drop_remainder and num_train < batch_size:
    raise ValueError(f"{source} has {num_train} images, fewer than one batch of {batch_size}")
  if num_train < 1:
    raise ValueError(f"{source} holds no images")
  return num_train // batch_size if drop_remainder else -(-num_train // batch_size)


def has_partial_batch(num_train: int, batch_size: int, drop_remainder: bool = False) -> bool:
  """Whether an epoch ends with a padded partial batch."""
  return not drop_remainder and num_train % batch_size != 0


def epoch_indices(seed: int, epoch: int, num_train: int, batch: int, num_out: int,
                  out_batch: int, *, drop_remainder: bool = False,
                  outlier_sampling: str = "window") -> Tuple[np.ndarray, np.ndarray]:
  """In-distribution indices ``int32 [steps, batch]`` and outlier indices ``int32 [steps,
  out_batch]`` of one epoch (``[steps, 0]`` without outliers).

  The ID indices are a permutation; a last partial batch is padded with ``PAD`` (-1). The outlier
  rows are a window ``(offset + k) % num_out`` (``"window"``) or fresh permutations of the pool,
  concatenated as needed (``"shuffle"``).
  """
  if outlier_sampling not in OUTLIER_SAMPLING:
    raise ValueError(f"outlier_sampling must be one of {OUTLIER_SAMPLING}, got {outlier_sampling!r}")
  rng = np.random.default_rng([seed, epoch])
  steps = steps_per_epoch(num_train, batch, drop_remainder)
  order = rng.permutation(num_train)[:steps * batch]
  in_idx = np.full(steps * batch, PAD, np.int64)
  in_idx[:len(order)] = order
  in_idx = in_idx.reshape(steps, batch).astype(np.int32)
  if not num_out:
    return in_idx, np.zeros((steps, 0), np.int32)
  need = steps * out_batch
  if outlier_sampling == "window":
    offset = int(rng.integers(num_out))
    pool = (offset + np.arange(need)) % num_out
  else:
    pool = np.concatenate([rng.permutation(num_out) for _ in range(-(-need // num_out))])[:need]
  return in_idx, pool.reshape(steps, out_batch).astype(np.int32)
