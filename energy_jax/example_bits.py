"""Random bits per example, keyed by the example's position in the global batch.

The randomness of a training step (augmentation, dropout) is drawn for each example from the
step's key and the example's position in the global batch, not from where the example sits on a
device: a run computes the same numbers on 1 device or 8, on one process or several.

:func:`example_bits` hashes each element's counter pair once. A key per example
(``jax.random.fold_in`` per position, then that key's bits) would hash every element twice, and
on a GPU, where XLA inlines all 20 rounds of each hash into every fusion that reads the bits,
that made a WRN-40-2 training program a third larger (docs/performance.md).
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
  """The two uint32 words of a Threefry key (typed or raw ``uint32[2]``); a key of another
  PRNG implementation is hashed into two words first."""
  words = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) \
      else rng
  if words.shape != (2,):
    words = jax.random.bits(rng, (2,), jnp.uint32)
  return words


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
