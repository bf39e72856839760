"""Random bits per example, keyed by the example's position in the global batch.

The randomness of a training step (augmentation, dropout) is drawn for each example from the
step's key and the example's position in the global batch, not from where the example sits on a
device: a run computes the same numbers on 1 device or 8, on one process or several.

:func:`example_bits` hashes each element's counter pair once. A key per example
(``jax.random.fold_in`` per position, then that key's bits) costs a second hash, and where the
hash is inlined (JAX's lowering for GPUs: its 20 rounds copied into every fusion that reads the
bits) it made a WRN-40-2 training program, compiled by XLA:CPU, a third larger
(docs/performance.md).

A key read here must not also be split or folded (``fold_in(key, j)`` hashes the pair
``(0, j)``, which is element ``j`` of example 0): the step's streams fold a key per stream and
per block, and each is read only here.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

Array = jax.Array


def key_words(rng: Array) -> Array:
  """The two uint32 words of a Threefry key (typed, or raw ``uint32[2]``); a typed key of another
  PRNG implementation gives two words drawn with that key."""
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
      raise ValueError(f"a raw key must be uint32[2] (Threefry), got {rng.dtype}{list(rng.shape)}:"
                       " pass a typed key (jax.random.key) for another PRNG implementation")
    return rng
  words = jax.random.key_data(rng)
  return words if words.shape == (2,) else jax.random.bits(rng, (2,), jnp.uint32)


def example_bits(rng: Array, example_ids: Array, shape: Sequence[int]) -> Array:
  """uint32 ``[len(example_ids), *shape]``: element ``j`` (row-major in ``shape``) of example
  ``i`` is ``b0 ^ b1``, with ``(b0, b1)`` the Threefry-2x32 hash (Salmon et al., 2011) of the
  counter pair ``(example_ids[i], j)`` under the key words of ``rng``: one hash per element, as
  ``jax.random.bits`` draws them, with the example's id as the high counter word."""
  shape = tuple(shape)
  full = (example_ids.shape[0],) + shape
  with jax.named_scope("example_bits"):        # names the ops in compiled programs' metadata
    words = key_words(rng)
    high = jnp.broadcast_to(example_ids.astype(jnp.uint32).reshape((-1,) + (1,) * len(shape)),
                            full)
    low = jnp.broadcast_to(jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape), full)
    b0, b1 = threefry2x32_p.bind(words[0], words[1], high, low)
    return b0 ^ b1


def below(bits: Array, probability: float) -> Array:
  """``bits < round(probability * 2**32)``: True with ``probability`` (to within 2**-32)."""
  return bits < np.uint32(min(round(probability * 2**32), 2**32 - 1))
