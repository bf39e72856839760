"""KNN: the distance to the K-th nearest training feature, exact, chunked and sharded.

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.

The bank is the L2-normalised penultimate features of the training set. Between unit vectors
``||q - b||^2 = 2 - 2 q.b``, so the K nearest are the K largest inner products: the bank is read in
chunks of rows, each chunk's similarities ``[Nq, chunk]`` reduced to their top K with
``jax.lax.top_k`` and merged into a running top K, so that the exact result never needs the
``[Nq, N_bank]`` matrix.

Memory, per device: the bank's own ``N_bank * D * 4 / devices`` bytes (float32, kept on the
devices), plus at most ``memory_bytes`` for one chunk's similarities and the top-k working space
(8 bytes per similarity: the chunk is ``memory_bytes // (8 * Nq)`` rows, at least K). With a
``mesh``, the bank's rows are sharded over its devices; each device finds the top K of its shard
and the candidates are gathered and merged (``jax.shard_map``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energy_jax import parallel
from energy_jax.detectors.base import Detector, hparam, register

HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_MEMORY_BYTES = 256 * 2**20


def normalize_rows(x):
  """``x / ||x||`` per row (a zero row stays zero)."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def chunk_rows(num_queries: int, shard_rows: int, k: int, memory_bytes: int) -> int:
  """Bank rows per chunk: the similarities and the top-k working space (8 bytes per entry) of
  ``num_queries`` queries within ``memory_bytes``, at least ``k``, at most the shard."""
  return int(min(shard_rows, max(k, memory_bytes // (8 * max(num_queries, 1)))))


def local_top_k(queries, bank, *, k: int, chunk: int, first_row, bank_size):
  """The ``k`` largest similarities ``[Nq, k]`` (descending) of ``queries`` against ``bank``
  rows ``first_row ...``, ignoring rows at or past ``bank_size`` (padding); -inf where fewer."""
  rows = bank.shape[0]
  num_chunks = -(-rows // chunk)
  best = jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32)

  def body(i, best):
    # The last chunk is shifted back to fit; the rows it reads twice are masked out.
    start = jnp.minimum(i * chunk, rows - chunk)
    block = jax.lax.dynamic_slice_in_dim(bank, start, chunk, axis=0)
    sims = jnp.matmul(queries, block.T, precision=HIGHEST)
    index = start + jnp.arange(chunk)
    valid = (index >= i * chunk) & (first_row + index < bank_size)
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    top = jax.lax.top_k(sims, min(k, chunk))[0]
    return jax.lax.top_k(jnp.concatenate([best, top], axis=-1), k)[0]

  return jax.lax.fori_loop(0, num_chunks, body, best)


def kth_similarity(queries, bank, bank_size, *, k: int, memory_bytes: int,
                   mesh: Optional[Mesh] = None):
  """The ``k``-th largest inner product of each (unit) query with the (unit) bank rows, exact:
  ``[Nq]``. With ``mesh`` the bank is sharded by rows over its devices."""
  devices = 1 if mesh is None else mesh.devices.size
  shard_rows = bank.shape[0] // devices
  chunk = chunk_rows(queries.shape[0], shard_rows, k, memory_bytes)
  if mesh is None:
    best = local_top_k(queries, bank, k=k, chunk=chunk, first_row=0, bank_size=bank_size)
    return best[:, k - 1]

  def per_device(q, shard, size):
    first = jax.lax.axis_index(parallel.AXIS) * shard_rows
    best = local_top_k(q, shard, k=k, chunk=chunk, first_row=first, bank_size=size)
    gathered = jax.lax.all_gather(best, parallel.AXIS, axis=1, tiled=True)
    return jax.lax.top_k(gathered, k)[0]

  best = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P()),
                       out_specs=P(), check_vma=False)(queries, bank, bank_size)
  return best[:, k - 1]


_normalize_rows = jax.jit(normalize_rows)


@register("knn")
@dataclasses.dataclass(frozen=True)
class KNN(Detector):
  """``-||q - b_(K)||``: minus the distance of the normalised features ``q = z / ||z||`` to their
  K-th nearest normalised training feature (see the module docstring for the exact chunked,
  sharded search and its memory).

  Sun et al., ICML 2022. OpenOOD v1.5: K 50 (CIFAR), sweep [50, 100, 200, 500, 1000]. K is
  static (it fixes ``top_k``'s shape); ``memory_bytes`` and ``mesh`` are not hyper-parameters of
  the score, only of its computation.
  """
  k: int = hparam(50, static=True)
  memory_bytes: int = hparam(DEFAULT_MEMORY_BYTES, static=True, label=False,
                             doc="bytes for one chunk's similarities per device")
  mesh: Optional[Mesh] = hparam(None, static=True, label=False, saved=False,
                                doc="shard the bank's rows over this mesh's devices")
  needs = frozenset({"features"})
  fit_needs = frozenset({"train_features"})
  grid = {"k": (50, 100, 200, 500, 1000)}

  def check_hparams(self):
    if int(self.k) != self.k or self.k < 1:
      raise ValueError(f"k (K) must be a positive integer, got {self.k!r}")
    if int(self.memory_bytes) != self.memory_bytes or self.memory_bytes < 1:
      raise ValueError(f"memory_bytes must be a positive integer, got {self.memory_bytes!r}")

  def fit_params(self, *, train_features, **unused):
    z = train_features if isinstance(train_features, jax.Array) else np.asarray(
        train_features, np.float32)
    n = z.shape[0]
    if n < self.k:
      raise ValueError(f"the bank holds {n} training features, fewer than K={self.k}")
    devices = 1 if self.mesh is None else self.mesh.devices.size
    pad = -n % devices
    if pad:
      z = jnp.concatenate([jnp.asarray(z, jnp.float32), jnp.zeros((pad, z.shape[1]), jnp.float32)])
    if self.mesh is not None:       # placed first: each device normalises its own rows
      z = jax.device_put(z, NamedSharding(self.mesh, P(parallel.AXIS)))
    return {"bank": _normalize_rows(z), "bank_size": jnp.asarray(n, jnp.int32)}

  def check(self, params, inputs):
    d_fit, d = params["bank"].shape[1], np.shape(inputs["features"])[1]
    if d != d_fit:
      raise ValueError(f"features have D={d}, the bank D={d_fit}")
    size = params["bank_size"]
    if not isinstance(size, jax.core.Tracer) and int(size) < self.k:
      raise ValueError(f"the bank holds {int(size)} features, fewer than "
                       f"K={self.k}")

  def compute(self, params, hp, *, features, **unused):
    s = kth_similarity(normalize_rows(features), params["bank"], params["bank_size"], k=self.k,
                       memory_bytes=self.memory_bytes, mesh=self.mesh)
    return -jnp.sqrt(jnp.maximum(2.0 - 2.0 * s, 0.0))
