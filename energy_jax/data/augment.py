"""On-device augmentation and normalisation (no TensorFlow): the device-resident input path.

``MEAN`` / ``STD`` are the reference's per-channel normalisation (CIFAR statistics, used for
every data set, as the reference does), on the 0..1 scale.

``random_crop_flip`` is the reference's ``RandomCrop(32, padding=4)`` (zero padding,
offsets 0..8 in each direction; any image size) followed by ``RandomHorizontalFlip()``; the order of
the two does not change the distribution. Images stay uint8 until the crop, so a
data set held on the device costs one byte per pixel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from energy_jax import example_bits

Array = jax.Array
PAD = 4
MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def normalize(images: Array, dtype=jnp.float32) -> Array:
  """uint8 ``[..., H, W, 3]`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(MEAN)) / jnp.asarray(STD)
  return x.astype(dtype)


def crop_flip_params(rng: Array, positions: Array):
  """Crop offsets ``[B, 2]`` in ``0..2*PAD`` and flip flags ``[B]``, example ``i``'s from three
  32-bit draws of :func:`energy_jax.example_bits.example_bits` for ``positions[i]``: an example's
  augmentation depends on its position in the global batch, not on which device holds it.
  Offsets are ``bits % (2*PAD + 1)`` (the first 4 of 9 values more likely by 2**-32), the flip
  ``bits < 2**31``."""
  bits = example_bits.example_bits(rng, positions, (3,))
  offsets = (bits[:, :2] % jnp.uint32(2 * PAD + 1)).astype(jnp.int32)
  return offsets, example_bits.below(bits[:, 2], 0.5)


def apply_crop_flip(images: Array, offsets: Array, flips: Array) -> Array:
  """Zero-pads by ``PAD``, crops ``[H, W]`` at ``offsets`` and mirrors where ``flips``."""
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))

  def one(img, off, flip):
    crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


def random_crop_flip(rng: Array, images: Array, positions: Array = None) -> Array:
  """The training augmentation on a uint8 or float batch ``[B, H, W, C]`` whose examples sit at
  ``positions`` of the global batch (default ``0..B-1``)."""
  if positions is None:
    positions = jnp.arange(images.shape[0])
  offsets, flips = crop_flip_params(rng, positions)
  return apply_crop_flip(images, offsets, flips)
