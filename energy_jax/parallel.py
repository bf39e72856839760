"""Data parallelism over all local devices: pmapped-style steps compiled with shard_map.

The per-device step is written as imagenet-style pmapped code: it sees its own
shard of the batch, averages gradients and metrics with ``lax.pmean`` over
``AXIS``, and BatchNorm synchronises its moments over the same axis. It is
compiled once with ``jax.jit(jax.shard_map(...))`` over a 1-D mesh (``jax.pmap``
is in maintenance mode).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``AXIS`` over the first ``num_devices`` local devices (default: all)."""
  devices = list(devices or jax.local_devices())
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
  """The per-device batch; raises if ``global_batch`` does not split evenly over the mesh."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what} {global_batch} is not divisible by the {n} devices of the mesh")
  return global_batch // n


def data_parallel(per_device_fn: Callable, mesh: Mesh, in_specs, out_specs,
                  donate_argnums=()) -> Callable:
  """``jax.jit(jax.shard_map(per_device_fn))``: specs use ``P()`` (replicated) or ``P(AXIS)``.

  ``check_vma=False`` gives the step ``pmap`` semantics: ``jax.grad`` returns this
  device's gradient and the step averages it with ``lax.pmean``. (With varying-axis
  checking on, the gradient of a replicated parameter is already summed over
  devices, and the explicit ``pmean`` would scale it by the device count.)
  """
  mapped = jax.shard_map(per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=donate_argnums)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """A sharding that splits the leading (batch) axis over ``mesh``."""
  return NamedSharding(mesh, P(AXIS))


def abstract(tree, sharding: NamedSharding):
  """Every leaf of ``tree`` (arrays or shapes) as a ``jax.ShapeDtypeStruct`` placed with
  ``sharding``: what a function is lowered and compiled for before the data exist."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                     weak_type=getattr(x, "weak_type", False)), tree)


def put_replicated(tree, mesh: Mesh):
  """Copies every leaf of ``tree`` to all devices of ``mesh`` (no copy if already there)."""
  return jax.device_put(tree, replicated(mesh))


def put_sharded(tree, mesh: Mesh):
  """Host arrays -> global arrays split along their first axis over the mesh."""
  return jax.device_put(tree, batch_sharded(mesh))
