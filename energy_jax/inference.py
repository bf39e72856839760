"""Batched inference on device: logits and penultimate features of a whole image set.

Every example is kept exactly once: the last batch is padded and the padding
dropped. Batches are split over the devices of the mesh (GSPMD partitions the
jitted forward pass).
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax import augment, models, parallel


@functools.partial(jax.jit, static_argnames=("model",))
def eval_step(model, variables, images_uint8):
  """Inference-mode ``(logits, features)`` float32 for a uint8 batch (normalised here)."""
  x = augment.normalize(images_uint8, model.dtype)
  logits, features = model.apply(variables, x, train=False, return_features=True)
  return logits.astype(jnp.float32), features.astype(jnp.float32)


def batch_bounds(num: int, batch_size: int):
  """``(start, stop)`` pairs covering ``range(num)``."""
  for start in range(0, num, batch_size):
    yield start, min(start + batch_size, num)


def predict(model: models.WideResNet, variables, images: np.ndarray, batch_size: int = 1000,
            mesh=None) -> Tuple[np.ndarray, np.ndarray]:
  """``(logits [N, C], features [N, D])`` float32 for uint8 images ``[N, 32, 32, 3]``.

  ``variables`` may already live on the mesh's devices (then nothing is copied).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"predict expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, batch_size - batch_size % n_dev)
  variables = parallel.put_replicated(variables, mesh)
  logits, feats = [], []
  # Every batch has the same shape (no recompilation); a lone batch only rounds up to the mesh.
  padded_size = batch_size if len(images) > batch_size else -(-len(images) // n_dev) * n_dev
  for start, stop in batch_bounds(len(images), batch_size):
    chunk = images[start:stop]
    pad = padded_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
    out_l, out_f = eval_step(model, variables, parallel.put_sharded(chunk, mesh))
    logits.append(np.asarray(out_l)[:stop - start])
    feats.append(np.asarray(out_f)[:stop - start])
  return np.concatenate(logits), np.concatenate(feats)
