"""Per-example random bits (energy_jax/example_bits.py) and what reads them, the dropout mask and
the crop and flip, against Threefry-2x32 written here in numpy."""

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from energy_jax import example_bits
from energy_jax.data import augment
from energy_jax.models.wrn import per_example_dropout


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 with 20 rounds (Salmon et al., 2011, as Random123 defines it), in numpy."""
  u32 = lambda v: np.asarray(v, np.uint64).astype(np.uint32)
  k0, k1, x0, x1 = map(u32, (k0, k1, x0, x1))
  keys = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  with np.errstate(over="ignore"):
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
      for r in rotations[i % 2]:
        x0 = x0 + x1
        x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
        x1 = x1 ^ x0
      x0 = x0 + keys[(i + 1) % 3]
      x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def numpy_bits(key, ids, n):
  """``[len(ids), n]``: b0 ^ b1 of the hash of (id, j) for j < n."""
  words = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                     else key)
  b0, b1 = threefry2x32(words[0], words[1], np.asarray(ids)[:, None], np.arange(n)[None, :])
  return b0 ^ b1


KEYS = (jax.random.PRNGKey(7), jax.random.fold_in(jax.random.key(9), 4))
IDS = np.array([5, 0, 2**31 + 1, 77], np.uint32)


def test_the_numpy_hash_gives_random123s_known_answers():
  hexes = lambda *args: [hex(int(v)) for v in threefry2x32(*args)]
  assert hexes(0, 0, 0, 0) == ["0x6b200159", "0x99ba4efe"]
  assert hexes(*[2**32 - 1] * 4) == ["0x1cb996fc", "0xbb002be7"]
  assert hexes(0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3) == ["0xc4923a9c", "0x483df7a0"]


def test_example_bits_hash_each_example_id_and_element_position():
  for key in KEYS:
    got = np.asarray(example_bits.example_bits(key, jnp.asarray(IDS), (2, 3)))
    np.testing.assert_array_equal(got, numpy_bits(key, IDS, 6).reshape(4, 2, 3))
  # A key of another PRNG implementation is hashed into two words first.
  rbg = jax.random.key(3, impl="rbg")
  bits = np.asarray(example_bits.example_bits(rbg, jnp.asarray(IDS), (5,)))
  words = np.asarray(jax.random.bits(rbg, (2,), jnp.uint32))
  b0, b1 = threefry2x32(words[0], words[1], IDS[:, None], np.arange(5)[None, :])
  np.testing.assert_array_equal(bits, b0 ^ b1)
  # Keys batched under vmap (a sweep's members) draw what each key draws alone.
  keys = jax.random.split(jax.random.key(4), 3)
  batched = jax.vmap(lambda k: example_bits.example_bits(k, jnp.asarray(IDS), (2,)))(keys)
  for k in range(3):
    np.testing.assert_array_equal(batched[k], numpy_bits(keys[k], IDS, 2))


def test_dropout_keeps_an_element_where_its_bits_fall_below_the_keep_probability():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5, 6), jnp.bfloat16)
  for key in KEYS:
    got = np.asarray(per_example_dropout(key, x, 0.3, jnp.asarray(IDS)), np.float32)
    keep = (numpy_bits(key, IDS, 90) < round(0.7 * 2**32)).reshape(x.shape)
    want = np.where(keep, np.asarray((x / 0.7).astype(jnp.bfloat16), np.float32), 0)
    np.testing.assert_array_equal(got, want)
    assert 0.55 < keep.mean() < 0.85            # 360 draws, each kept with probability 0.7
  # An example's mask is its own wherever it sits in the batch.
  key = KEYS[0]
  whole = per_example_dropout(key, x, 0.3, jnp.asarray(IDS))
  part = per_example_dropout(key, x[2:][::-1], 0.3, jnp.asarray(IDS[2:][::-1]))
  np.testing.assert_array_equal(np.asarray(part, np.float32),
                                np.asarray(whole[2:][::-1], np.float32))


def test_crop_and_flip_read_three_draws_of_each_example():
  images = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
  for key in KEYS:
    got = np.asarray(augment.random_crop_flip(key, jnp.asarray(images), jnp.asarray(IDS)))
    bits = numpy_bits(key, IDS, 3)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(4):
      dy, dx = bits[i, 0] % 9, bits[i, 1] % 9
      want = padded[i, dy:dy + 6, dx:dx + 5]
      np.testing.assert_array_equal(got[i], want[:, ::-1] if bits[i, 2] < 2**31 else want)


def test_a_raw_key_that_is_not_two_uint32_words_is_refused_naming_its_shape():
  with pytest.raises(ValueError, match=r"a raw key must be uint32\[2\] \(Threefry\), got "
                                       r"uint32\[4\]"):
    example_bits.example_bits(jnp.zeros((4,), jnp.uint32), jnp.arange(2), (3,))
