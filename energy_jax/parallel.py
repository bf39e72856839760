"""Data parallelism over every device of every process: pmapped-style steps compiled with
shard_map over one global mesh.

The per-device step is written as imagenet-style pmapped code: it sees its own shard of the
batch, reduces gradients and metrics with ``lax.psum`` over ``AXIS``, and BatchNorm synchronises
its moments over the same axis. It is compiled once with ``jax.jit(jax.shard_map(...))`` over a
1-D mesh of all devices (``jax.pmap`` is in maintenance mode). With several processes
(:mod:`energy_jax.distributed`), each process holds the devices of one contiguous slice of the
mesh, and with them one contiguous slice of every global batch (:func:`process_rows`). A sweep
may lay the same devices out as a 2-D mesh whose second axis, ``MEMBERS``, splits its members
(:func:`member_mesh`); its steps still reduce over ``AXIS`` only.

Across CPU processes (XLA:CPU exchanges collectives through Gloo), programs with collectives
that queue up unfinished can deadlock. ``python benchmarks/cpu_collective_queue.py --runs 3``
(2026-12-07, a 2-core AMD EPYC, 2 processes x 2 devices, a run counted as hung after 60 s): 120
one-``psum`` programs dispatched without waiting hung 3 runs of 3; chained, each taking the one
before's output, 3 of 3; waited for one by one, 0 of 3; ``jax.device_put`` of 120 split arrays
1 of 3 (5 of 5 in another run that day); one program gathering them, 0 of 3. So the library
waits for such a program before it dispatches the next (:func:`to_host` waits for its arrays
before gathering them; the training loop reads each call's metrics, inference each batch's
outputs) and moves a pytree to another layout with one program (:func:`gather_replicated`), not
with ``jax.device_put``'s one per array.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
# A sweep's second mesh axis (energy_jax.train.sweep): each index along it is a group of devices
# that trains its share of the members, data-parallel over the group's AXIS.
MEMBERS = "members"


def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``AXIS`` over the first ``num_devices`` devices of all processes (default:
  all; with several processes, all of them)."""
  devices = list(devices or jax.devices())
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are available")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(f"a run of {jax.process_count()} processes uses all their "
                       f"{len(devices)} devices; num_devices={num_devices} would leave some out")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def member_mesh(mesh: Mesh, groups: int) -> Mesh:
  """The devices of the 1-D ``mesh`` as a 2-D mesh ``(MEMBERS, AXIS)`` of ``groups`` groups of
  consecutive devices (``mesh`` itself for one group); ``groups`` divides the device count."""
  if groups == 1:
    return mesh
  n = mesh.devices.size
  assert n % groups == 0, (n, groups)
  return Mesh(mesh.devices.reshape(groups, n // groups), (MEMBERS, AXIS))


def process_rows(global_rows: int, mesh: Mesh) -> slice:
  """The rows of a global batch (split over ``mesh`` along its first axis) that this process
  supplies: those of its devices, which are contiguous in the mesh."""
  devices = list(mesh.devices.flat)
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  per_device = global_rows // len(devices)
  return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def check_divisible(global_batch: int, mesh: Mesh, what: str = "batch size") -> int:
  """The per-device batch; raises if ``global_batch`` does not split evenly over the mesh's
  batch axis (all its devices, or each member group's: :func:`member_mesh`)."""
  n = mesh.shape[AXIS]
  if global_batch % n:
    where = "devices of the mesh"
    if MEMBERS in mesh.axis_names:
      where = (f"devices of each of the config.member_groups = {mesh.shape[MEMBERS]} groups "
               f"({mesh.devices.size} devices)")
    raise ValueError(f"{what} {global_batch} is not divisible by the {n} {where}")
  return global_batch // n


def data_parallel(per_device_fn: Callable, mesh: Mesh, in_specs, out_specs,
                  donate_argnums=()) -> Callable:
  """``jax.jit(jax.shard_map(per_device_fn))``: specs use ``P()`` (replicated), ``P(AXIS)``
  or, on a :func:`member_mesh`, ``P(MEMBERS)``.

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
  """Copies every leaf of ``tree`` to all devices of ``mesh`` (no copy if already there). With
  several processes every process must pass the same values, which go to its own devices only
  (no cross-process transfer): one fingerprint of all of them is compared across processes, and
  a difference is an error naming the leaf count."""
  return _put_everywhere_same(tree, replicated(mesh), "put_replicated", "replicate")


def put_split(tree, mesh: Mesh, spec: P):
  """Values every process holds whole -> global arrays split by ``spec`` over ``mesh``, each
  process placing its own devices' parts (no cross-process transfer); with several processes
  compared across them as :func:`put_replicated` does."""
  return _put_everywhere_same(tree, NamedSharding(mesh, spec), "put_split", "place")


def _put_everywhere_same(tree, sharding: NamedSharding, name: str, verb: str):
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  # jax.device_put would compare every host leaf across processes, one collective (and one
  # compiled gather per shape) per leaf: ~20 s for a training state on XLA:CPU.
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  placed, fingerprint = [], 0
  for x in leaves:
    if isinstance(x, jax.Array) and x.sharding == sharding:
      placed.append(x)
      continue
    x = np.asarray(x)
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    fingerprint = zlib.crc32(np.ascontiguousarray(x).view(np.uint8).reshape(-1), fingerprint)
    fingerprint = zlib.crc32(f"{x.shape}{x.dtype}".encode(), fingerprint)
    placed.append(jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]))
  from jax.experimental import multihost_utils
  multihost_utils.assert_equal(
      np.uint32(fingerprint),
      f"{name}: the {len(leaves)} values to {verb} differ between processes")
  return jax.tree_util.tree_unflatten(treedef, placed)


def put_sharded(tree, mesh: Mesh):
  """This process's rows (all rows with one process) -> global arrays split along their first
  axis over the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(tree, batch_sharded(mesh))
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def put_global(tree, mesh: Mesh, spec: P):
  """Host arrays that every process holds whole -> global arrays placed by ``spec``."""
  return jax.device_put(tree, NamedSharding(mesh, spec))


def gather_replicated(tree, mesh: Mesh):
  """Global arrays split over ``mesh`` -> the same values on every device of it, gathered by one
  program. Not ``jax.device_put``, which runs one program per array: across CPU processes those
  queue up and can deadlock (measured: the module's docstring)."""
  return _gather_fn(replicated(mesh))(tree)


@functools.lru_cache(maxsize=None)
def _gather_fn(sharding: NamedSharding) -> Callable:
  return jax.jit(lambda tree: tree, out_shardings=sharding)


def to_host(tree):
  """Global arrays -> numpy on every process (gathered across processes where needed, once the
  programs computing them have finished: see the module's docstring)."""
  jax.block_until_ready(tree)

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(one, tree)
