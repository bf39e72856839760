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


def padded_batch_size(num: int, batch_size: int, num_devices: int) -> Tuple[int, int]:
  """``(step, padded)``: images per batch (a multiple of the devices) and the shape every batch
  is padded to (no recompilation; a lone batch only rounds up to the devices)."""
  step = max(num_devices, batch_size - batch_size % num_devices)
  return step, step if num > step else -(-num // num_devices) * num_devices


def compile_predict(model: models.WideResNet, variables, num: int, batch_size: int = 1000,
                    mesh=None) -> None:
  """Compiles what :func:`predict` runs for ``num`` images; ``variables`` may be shapes
  (``jax.ShapeDtypeStruct``). With JAX's persistent compilation cache on, a later
  ``predict`` in another thread or process loads it from there."""
  mesh = mesh or parallel.make_mesh()
  _, padded = padded_batch_size(num, batch_size, mesh.devices.size)
  eval_step.lower(model, parallel.abstract(variables, parallel.replicated(mesh)),
                  parallel.abstract(jax.ShapeDtypeStruct((padded, 32, 32, 3), jnp.uint8),
                                    parallel.batch_sharded(mesh))).compile()


def predict(model: models.WideResNet, variables, images: np.ndarray, batch_size: int = 1000,
            mesh=None) -> Tuple[np.ndarray, np.ndarray]:
  """``(logits [N, C], features [N, D])`` float32 for uint8 images ``[N, 32, 32, 3]``.

  ``variables`` may already live on the mesh's devices (then nothing is copied).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"predict expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  mesh = mesh or parallel.make_mesh()
  batch_size, padded_size = padded_batch_size(len(images), batch_size, mesh.devices.size)
  variables = parallel.put_replicated(variables, mesh)
  logits, feats = [], []
  for start, stop in batch_bounds(len(images), batch_size):
    chunk = images[start:stop]
    pad = padded_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
    out_l, out_f = eval_step(model, variables, parallel.put_sharded(chunk, mesh))
    logits.append(np.asarray(out_l)[:stop - start])
    feats.append(np.asarray(out_f)[:stop - start])
  return np.concatenate(logits), np.concatenate(feats)
