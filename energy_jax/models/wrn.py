"""Flax WideResNet, layer for layer the reference network of Liu et al. (2020), registered as
``"wrn"``.

The reference is ``CIFAR/models/wrn.py`` of github wetliu/energy_ood (itself the
Outlier Exposure WRN): pre-activation basic blocks, dropout between the two 3x3
convolutions, and -- where the channel count changes -- a 1x1 shortcut that reads
``relu(bn1(x))`` rather than ``x``. WRN-40-2 with 10 classes has 2,243,546
parameters.

Parameter names follow the PyTorch module tree (``block1/layer_0/conv1`` for
``block1.layer.0.conv1``) so that converted checkpoints are easy to audit.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from energy_jax import example_bits
from energy_jax.fields import choice, fail, integer, positive, real
from energy_jax.models import wrn_convert
from energy_jax.models.base import ModelOutput, register

Array = jax.Array
Dtype = Any
POOLINGS = ("mean", "reference")

# He-normal on fan-out, untruncated: N(0, sqrt(2 / (k * k * out_channels))).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics, optionally synchronised across devices.

  Normalises with the biased batch variance and updates the running variance
  with the unbiased one, ``running = (1 - momentum) * running + momentum * batch``
  (PyTorch's ``momentum=0.1`` convention). Statistics are always computed in
  float32, whatever ``dtype`` the activations have. With ``axis_name`` set, the
  batch moments come from sums and counts summed over that mapped axis, so N devices normalise
  exactly as one device would on the global batch. With a ``mask`` (``[N]``, True for real
  examples), the moments are those of the real examples only: the padded last batch of an
  epoch normalises as the reference's smaller batch does, however its examples fall on the
  devices.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool, mask: Optional[Array] = None) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((features,), jnp.float32))
    reduce_axes = tuple(range(x.ndim - 1))
    if train:
      # Sums and counts, summed over the devices: the moments of the real examples of the
      # global batch, however they fall on the devices.
      x32 = x.astype(jnp.float32)
      if mask is None:
        sums = (jnp.sum(x32, axis=reduce_axes), jnp.sum(jnp.square(x32), axis=reduce_axes),
                jnp.float32(x.size // features))
      else:
        w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        sums = (jnp.sum(x32 * w, axis=reduce_axes),
                jnp.sum(jnp.square(x32) * w, axis=reduce_axes),
                jnp.sum(w) * (x.size // (features * x.shape[0])))
      if self.axis_name is not None and not self.is_initializing():
        sums = lax.psum(sums, self.axis_name)
      count = jnp.maximum(sums[2], 1.0)
      mean, mean_sq = sums[0] / count, sums[1] / count
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1, 1)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(self.dtype)


def per_example_dropout(rng: Array, x: Array, rate: float,
                        example_ids: Optional[Array] = None) -> Array:
  """Inverted dropout: element ``j`` of example ``i`` is kept where its bits
  (:func:`energy_jax.example_bits.example_bits` of ``rng`` and ``example_ids[i]``) fall below
  ``(1 - rate) * 2**32``. Given global positions as ids, the masks do not depend on how a batch is
  split over devices."""
  if example_ids is None:
    example_ids = jnp.arange(x.shape[0])
  keep = example_bits.below(example_bits.example_bits(rng, example_ids, x.shape[1:]), 1.0 - rate)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class BasicBlock(nn.Module):
  """Pre-activation block: bn-relu-conv3x3-bn-relu-dropout-conv3x3 + shortcut."""

  out_channels: int
  stride: int
  dropout_rate: float
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool, mask: Optional[Array] = None,
               example_ids: Optional[Array] = None) -> Array:
    conv = lambda c, k, s, name: nn.Conv(
        c, (k, k), strides=(s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    bn = lambda name: BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name=name)
    equal_in_out = x.shape[-1] == self.out_channels
    preact = nn.relu(bn("bn1")(x, train=train, mask=mask))
    out = conv(self.out_channels, 3, self.stride, "conv1")(preact)
    out = nn.relu(bn("bn2")(out, train=train, mask=mask))
    if self.dropout_rate > 0 and train:
      out = per_example_dropout(self.make_rng("dropout"), out, self.dropout_rate, example_ids)
    out = conv(self.out_channels, 3, 1, "conv2")(out)
    if equal_in_out:
      return x + out
    # Where channels change the shortcut reads the pre-activation, as the reference.
    return conv(self.out_channels, 1, self.stride, "conv_shortcut")(preact) + out


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` on NHWC normalised images of any size.

  The final pooling is a global mean (``pooling="mean"``), which equals the reference's
  ``avg_pool2d(8)`` at 32x32. ``pooling="reference"`` is that 8x8 window itself: on the 9x9 map of
  a 36x36 image it pools the top-left 8x8 only, as the reference network does when it is fed
  larger images unresized.

  Attributes:
    depth: total layers, ``(depth - 4) % 6 == 0`` (40 for WRN-40-2).
    widen_factor: channel multiplier k (2 for WRN-40-2).
    num_classes: number of logits.
    dropout_rate: dropout inside each block (0.3 in the paper).
    axis_name: mapped axis over which BatchNorm statistics are synchronised.
    dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters and
      BatchNorm statistics stay float32.
    pooling: ``"mean"`` or ``"reference"`` (see above).
  """

  depth: int = 40
  widen_factor: int = 2
  num_classes: int = 10
  dropout_rate: float = 0.3
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  pooling: str = "mean"

  def setup(self):
    """Validates the architecture before any layer is built."""
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {self.depth}")
    if self.widen_factor < 1 or self.num_classes < 1:
      raise ValueError(f"widen_factor and num_classes must be >= 1, got "
                       f"{self.widen_factor}, {self.num_classes}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"WideResNet pooling must be one of {POOLINGS}, got {self.pooling!r}")

  @property
  def channels(self) -> Tuple[int, int, int, int]:
    """Channels of the stem and the three groups: ``(16, 16k, 32k, 64k)``."""
    k = self.widen_factor
    return (16, 16 * k, 32 * k, 64 * k)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, mask: Optional[Array] = None,
               example_ids: Optional[Array] = None) -> ModelOutput:
    """``ModelOutput(logits [N, num_classes], features [N, 64k], blocks)``, all float32.

    ``features`` are the penultimate activations ``avgpool(relu(bn(h)))``, as the reference's
    ``intermediate_forward`` averaged over space (what Mahalanobis fits its Gaussians on);
    ``blocks`` the spatial means of the stem and of the first two groups, then ``features``.
    ``mask`` (``[N]`` bool, training only): BatchNorm statistics over the True examples only.
    ``example_ids`` (``[N]`` int, training only): each example's dropout mask is drawn from the
    dropout rng and its id (default ``0..N-1``; :func:`per_example_dropout`).
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"WideResNet expects NHWC images with 3 channels, got shape {x.shape}")
    n = (self.depth - 4) // 6
    c = self.channels
    pooled = lambda h: jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    out = nn.Conv(c[0], (3, 3), padding=[(1, 1), (1, 1)], use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                  name="conv1")(x.astype(self.dtype))
    blocks = [pooled(out)]
    for group, (channels, stride) in enumerate(zip(c[1:], (1, 2, 2)), start=1):
      for i in range(n):
        out = BasicBlock(channels, stride if i == 0 else 1, self.dropout_rate,
                         axis_name=self.axis_name, dtype=self.dtype,
                         name=f"block{group}_layer_{i}")(out, train=train, mask=mask,
                                                         example_ids=example_ids)
      if group < 3:
        blocks.append(pooled(out))
    out = nn.relu(BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name="bn1")(
        out, train=train, mask=mask))
    if self.pooling == "reference":
      if out.shape[1] // 8 != 1 or out.shape[2] // 8 != 1:
        raise ValueError(f"pooling='reference' (avg_pool2d(8)) needs a final map of 8 to 15 "
                         f"pixels a side, got {out.shape[1:3]} from images {x.shape[1:3]}")
      out = out[:, :8, :8]
    features = pooled(out)
    logits = nn.Dense(self.num_classes, kernel_init=dense_init,
                      bias_init=nn.initializers.zeros, dtype=jnp.float32,
                      param_dtype=jnp.float32, name="fc")(features)
    return ModelOutput(logits, features, (*blocks, features))


def _depth(name: str, value) -> None:
  integer(10)(name, value)
  if (value - 4) % 6:
    fail(name, value, "6n+4 (10, 16, 22, 28, 40, ...: n blocks per group of the WRN)")


@register("wrn", shape_fields=("depth", "widen_factor"), head="fc",
          from_torch=wrn_convert.state_dict_to_variables,
          meanings={"depth": "WRN depth, 6n+4", "widen_factor": "WRN channel multiplier k",
                    "dropout_rate": "dropout inside each WRN block",
                    "pooling": "WRN final pooling: mean (global) | reference (avg_pool2d(8): "
                               "the top-left 8x8 of a larger map)"},
          checks={"depth": _depth, "widen_factor": positive,
                  "dropout_rate": real(0.0, 1.0, high_open=True),
                  "pooling": choice(lambda: POOLINGS)})
def build(*, num_classes: int, dtype=jnp.float32, axis_name: Optional[str] = None,
          depth: int = WideResNet.depth, widen_factor: int = WideResNet.widen_factor,
          dropout_rate: float = WideResNet.dropout_rate,
          pooling: str = WideResNet.pooling) -> WideResNet:
  """WRN-``depth``-``widen_factor`` (``config.model``: ``depth``, ``widen_factor``,
  ``dropout_rate``, ``pooling``)."""
  return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes,
                    dropout_rate=dropout_rate, axis_name=axis_name, dtype=dtype, pooling=pooling)
