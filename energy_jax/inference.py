"""Batched inference on the devices: a model's outputs (logits, features, blocks) for a whole
image set.

Every example is kept exactly once: the last batch is padded and the padding dropped. Batches
are split over the devices of the mesh (GSPMD partitions the jitted forward pass); with several
processes each scores its share and every process receives all the outputs.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from energy_jax import parallel, progress
from energy_jax.batching import batch_bounds
from energy_jax.data import augment
from energy_jax.models import ModelOutput


@functools.partial(jax.jit, static_argnames=("model", "blocks"))
def eval_step(model, variables, images_uint8, blocks: bool = False) -> ModelOutput:
  """Inference-mode :class:`ModelOutput` (float32) for a uint8 batch (normalised here); its
  ``blocks`` only when asked for (otherwise ``()``: XLA leaves their reductions out, and the
  logits' program is the same with or without detectors that need them)."""
  x = augment.normalize(images_uint8, model.dtype)
  out = model.apply(variables, x, train=False)
  out = out._replace(blocks=out.blocks if blocks else ())
  return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), out)


def padded_batch_size(num: int, batch_size: int, num_devices: int) -> Tuple[int, int]:
  """``(step, padded)``: images per batch (a multiple of the devices) and the shape every batch
  is padded to (no recompilation; a lone batch only rounds up to the devices)."""
  step = max(num_devices, batch_size - batch_size % num_devices)
  return step, step if num > step else -(-num // num_devices) * num_devices


def lower_predict(model, variables, image_shape: Tuple[int, int, int], num: int,
                  batch_size: int = 1000, mesh=None, blocks: bool = False):
  """The lowered batch program :func:`predict` runs for ``num`` images of ``image_shape``
  (``[H, W, 3]``; ``variables`` may be ``jax.ShapeDtypeStruct``): compiled ahead, it is the
  executable ``predict`` then calls in this process. Every batch of a set is padded to one
  shape, so a set is one program, shared by any set that pads to the same batch."""
  mesh = mesh or parallel.make_mesh()
  _, padded = padded_batch_size(num, batch_size, mesh.devices.size)
  return eval_step.lower(
      model, parallel.abstract(variables, parallel.replicated(mesh)),
      jax.ShapeDtypeStruct((padded, *image_shape), jnp.uint8,
                           sharding=parallel.batch_sharded(mesh)), blocks)


# Inference shows a progress bar from this many batches on.
PROGRESS_MIN_BATCHES = 10


def predict(model, variables, images: np.ndarray, batch_size: int = 1000,
            mesh=None, blocks: bool = False, progress_bar: Optional[bool] = None,
            desc: str = "inference") -> ModelOutput:
  """:class:`ModelOutput` of numpy float32 arrays for uint8 images ``[N, H, W, 3]`` (with the
  per-stage ``blocks`` if asked for).

  ``variables`` may already live on the mesh's devices (then nothing is copied).
  ``progress_bar``: a bar of the images done (None: when there are at least
  ``PROGRESS_MIN_BATCHES`` batches).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"predict expects uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
  mesh = mesh or parallel.make_mesh()
  batch_size, padded_size = padded_batch_size(len(images), batch_size, mesh.devices.size)
  variables = parallel.put_replicated(variables, mesh)
  num_batches = -(-len(images) // batch_size)
  if progress_bar is None:
    progress_bar = num_batches >= PROGRESS_MIN_BATCHES
  shown = progress.bar(len(images), desc, progress_bar, unit="img")
  parts = []
  for start, stop in batch_bounds(len(images), batch_size):
    chunk = images[start:stop]
    pad = padded_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
    # Each process supplies its devices' rows of the batch and receives all the outputs.
    rows = parallel.process_rows(len(chunk), mesh)
    out = parallel.to_host(eval_step(model, variables, parallel.put_sharded(chunk[rows], mesh),
                                     blocks))
    parts.append(jax.tree_util.tree_map(lambda a: a[:stop - start], out))
    shown.update(stop - start)
  shown.close()
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
