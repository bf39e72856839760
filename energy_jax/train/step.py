"""The training step and the compiled functions that run it over a mesh.

``train_step(state, batch) -> (state, metrics)`` is the per-device step, written pmap-style: each
device computes its share of the global batch's mean loss (its sum over the global count of real
examples), and gradients and metrics are summed with ``lax.psum`` over ``parallel.AXIS``, so
any split of the batch over the devices, the padded last batch of an epoch included, computes
what one device would. In-distribution and outlier images go through the network in ONE forward
pass, so BatchNorm sees all ``128 + 256`` images, as in the reference. Two ways to feed it:

* device-resident (``config.input_pipeline = "device"``): the data sets live on the devices as
  uint8, augmentation runs inside the compiled step, and ``steps_per_call`` steps are fused into
  one ``lax.scan`` (:func:`device_epoch_fn`);
* host batches (``"tfdata"``): augmented batches from :mod:`energy_jax.data.host_stream`, one
  compiled step per call (:func:`host_step_fn`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from energy_jax import models, objectives, parallel
from energy_jax.data import augment
from energy_jax.train.state import TrainState, hashable_config

Array = jax.Array
# The streams of one step's randomness, each folded into fold_in(state.rng, state.step); each
# example's draws then hash its position in the global batch (energy_jax/example_bits.py): the
# same on every device and process.
AUGMENT_IN, AUGMENT_OUT, DROPOUT = 1, 2, 3


def global_positions(n_local: int, axis_name: Optional[str], offset=0) -> Array:
  """Positions in the global batch of this device's ``n_local`` examples: devices hold
  consecutive slices in mesh order (``offset``: where this part of the batch starts)."""
  start = lax.axis_index(axis_name) * n_local if axis_name is not None else 0
  return offset + start + jnp.arange(n_local)


def global_size(n_local: int, axis_name: Optional[str]):
  """Examples in the global batch when each device holds ``n_local``."""
  return n_local * lax.psum(1, axis_name) if axis_name is not None else n_local


def share_of_mean(mask: Optional[Array], n: int, axis_name: Optional[str]):
  """``mean(x)``: this device's share of the mean of per-example ``x [n]`` over the real examples
  (``mask``) of all devices, ``sum_local(x * mask) / count_global``."""
  if mask is None:
    count = n * (lax.psum(1, axis_name) if axis_name is not None else 1)
    return lambda x: jnp.sum(x) / count
  weights = mask.astype(jnp.float32)
  count = jnp.sum(weights)
  if axis_name is not None:
    count = lax.psum(count, axis_name)
  count = jnp.maximum(count, 1.0)
  return lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / count


def objective_loss(config, output: models.ModelOutput, labels: Array, num_in: int,
                   mask_in: Optional[Array] = None, axis_name: Optional[str] = None):
  """``(loss, metrics)`` of ``config.objective`` on the model's output for ``[in; out]`` images,
  as this device's share (summed over ``axis_name``, they are the global batch's); metrics add
  ``loss`` and the in-distribution ``accuracy``. ``mask_in``: the real in-distribution
  examples."""
  logits, features = output.logits, output.features
  mean_in = share_of_mean(mask_in, num_in, axis_name)
  mean_out = share_of_mean(None, logits.shape[0] - num_in, axis_name)
  loss, metrics = objectives.get(config.objective.name).loss(
      config.objective, logits_in=logits[:num_in], logits_out=logits[num_in:],
      features_in=features[:num_in], features_out=features[num_in:], labels=labels,
      mean_in=mean_in, mean_out=mean_out)
  metrics["loss"] = loss
  metrics["accuracy"] = mean_in((jnp.argmax(logits[:num_in], -1) == labels).astype(jnp.float32))
  return loss, metrics


def train_step(state: TrainState, batch: Mapping[str, Array], *, config,
               axis_name: Optional[str] = parallel.AXIS) -> Tuple[TrainState, Dict[str, Array]]:
  """One step of ``state.tx`` on this device's shard; ``batch`` has ``image``, ``label``, for the
  objectives that use outliers ``outlier`` (normalised NHWC float images), and in a padded batch
  ``mask`` (``[B]`` bool, True for the real in-distribution images). Dropout is drawn per example from its
  position in the global batch (outliers after all in-distribution images)."""
  model = models.from_config(config, axis_name=axis_name)
  num_in = batch["image"].shape[0]
  images = batch["image"]
  mask_in = batch.get("mask")
  mask = mask_in
  ids = global_positions(num_in, axis_name)
  if objectives.get(config.objective.name).uses_outliers:
    num_out = batch["outlier"].shape[0]
    images = jnp.concatenate([images, batch["outlier"].astype(images.dtype)], axis=0)
    ids = jnp.concatenate([ids, global_positions(num_out, axis_name,
                                                 global_size(num_in, axis_name))])
    if mask is not None:
      mask = jnp.concatenate([mask, jnp.ones((num_out,), bool)])
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), DROPOUT)
  kwargs = {"example_ids": ids} if mask is None else {"example_ids": ids, "mask": mask}

  def loss_fn(params):
    out, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                train=True, rngs={"dropout": rng}, mutable=["batch_stats"],
                                **kwargs)
    loss, metrics = objective_loss(config, out, batch["label"], num_in, mask_in, axis_name)
    return loss, (new_vars["batch_stats"], metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, metrics = lax.psum((grads, metrics), axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


def device_batch(step_key: Array, data: Mapping[str, Array], in_idx: Array,
                 out_idx: Optional[Array], dtype, padded: bool = False,
                 axis_name: Optional[str] = None) -> Dict[str, Array]:
  """Gathers this device's indices from the device-resident data and augments them, each
  example from ``step_key`` and its position in the global batch; with ``padded``, negative
  indices are padding (``mask`` False, image 0 in their place)."""
  if padded:
    mask, in_idx = in_idx >= 0, jnp.maximum(in_idx, 0)
  at = global_positions(in_idx.shape[0], axis_name)
  batch = {"image": augment.normalize(augment.random_crop_flip(
               jax.random.fold_in(step_key, AUGMENT_IN), data["image"][in_idx], at), dtype),
           "label": data["label"][in_idx]}
  if padded:
    batch["mask"] = mask
  if out_idx is not None:
    at = global_positions(out_idx.shape[0], axis_name)
    batch["outlier"] = augment.normalize(augment.random_crop_flip(
        jax.random.fold_in(step_key, AUGMENT_OUT), data["outlier"][out_idx], at), dtype)
  return batch


def device_data(images, labels, outliers=None) -> Dict[str, Any]:
  """The device-resident pools :func:`device_epoch_fn` gathers from (arrays or shapes)."""
  data = {"image": images, "label": labels}
  if outliers is not None:
    data["outlier"] = outliers
  return data


# An index that marks a row of a fused call's index arrays as no step: rows of SKIP_STEP after
# the real steps let a shorter call (an epoch's last, a resumed epoch's first) run in the program
# compiled for the longest.
SKIP_STEP = int(jnp.iinfo(jnp.int32).min)


def _scan_unroll(config):
  # XLA:CPU runs convolutions inside a while loop ~30x slower: unroll the fused steps there.
  return config.scan_unroll or jax.default_backend() == "cpu"


def fixed_length_calls(config) -> bool:
  """Whether one compiled program runs every call of an epoch, whatever its number of steps:
  the steps in a loop (``lax.fori_loop`` to the call's count of real rows, see
  :func:`pad_call`), as on accelerators by default. Unrolled steps (XLA:CPU's default) are
  straight-line code of a fixed number of steps: a call of another length is another program."""
  unroll = _scan_unroll(config)
  return unroll is False or (type(unroll) is int and unroll == 1)   # (True == 1 in Python)


def pad_call(in_idx, out_idx, length: int):
  """The index arrays of a call of ``len(in_idx)`` steps as rows of a ``length``-step call:
  rows of :data:`SKIP_STEP` after the real ones, which the program does not run."""
  n = in_idx.shape[0]
  if n == length:
    return in_idx, out_idx
  if n > length:
    raise ValueError(f"a call of {n} steps does not fit a program of {length}")
  skip = lambda a: np.concatenate([a, np.full((length - n, *a.shape[1:]), SKIP_STEP, a.dtype)])
  return skip(np.asarray(in_idx)), skip(np.asarray(out_idx))


def run_call_steps(body: Callable, carry, in_idx: Array, out_idx: Array, config):
  """``(carry, metrics [S, ...])``: ``body(carry, (in_idx[k], out_idx[k])) -> (carry, metrics)``
  for the rows of a fused call, as ``lax.scan``, unrolled where :func:`_scan_unroll` says. Where
  :func:`fixed_length_calls`, a loop over the rows before the first :data:`SKIP_STEP` row (every
  device holds a column of every row, so each counts the same); the metrics of rows not run
  are 0."""
  if not fixed_length_calls(config):
    if in_idx.shape[0] == 1:
      # A scan of one step is a while loop of one trip. XLA:CPU gives convolutions the layouts of
      # its fast (Eigen) kernels only in the entry computation, before it removes such a loop: in
      # the loop they stay in its generic kernel, ~16x slower (docs/performance.md). One step is
      # one call of the body.
      carry, metrics = body(carry, (in_idx[0], out_idx[0]))
      return carry, jax.tree_util.tree_map(lambda v: v[None], metrics)
    return lax.scan(body, carry, (in_idx, out_idx), unroll=_scan_unroll(config))
  num_steps = jnp.sum(in_idx[:, 0] != SKIP_STEP)
  shapes = jax.eval_shape(body, carry, (in_idx[0], out_idx[0]))[1]
  metrics = jax.tree_util.tree_map(
      lambda s: jnp.zeros((in_idx.shape[0], *s.shape), s.dtype), shapes)

  def loop_body(i, state):
    carry, metrics = state
    carry, m = body(carry, (in_idx[i], out_idx[i]))
    return carry, jax.tree_util.tree_map(lambda buf, v: buf.at[i].set(v), metrics, m)
  return lax.fori_loop(0, num_steps, loop_body, (carry, metrics))


@functools.lru_cache(maxsize=None)
def _device_epoch_fn(config, mesh, padded: bool) -> Callable:
  dtype = models.from_config(config).dtype
  uses_outliers = objectives.get(config.objective.name).uses_outliers

  def per_device(state, data, in_idx, out_idx):
    def body(state, idx):
      i_in, i_out = idx
      batch = device_batch(jax.random.fold_in(state.rng, state.step), data, i_in,
                           i_out if uses_outliers else None, dtype, padded, parallel.AXIS)
      return train_step(state, batch, config=config)

    return run_call_steps(body, state, in_idx, out_idx, config)

  spec_idx = step_indices_spec()
  return parallel.data_parallel(per_device, mesh, in_specs=(P(), P(), spec_idx, spec_idx),
                                out_specs=(P(), P()), donate_argnums=(0,))


def step_indices_spec() -> P:
  """How the index arrays ``[steps, batch]`` of a fused call lie on the mesh: each device holds
  its columns of every step."""
  return P(None, parallel.AXIS)


def device_epoch_fn(config, mesh, padded: bool = False) -> Callable:
  """``fn(state, data, in_idx [S, B], out_idx [S, B_out]) -> (state, metrics [S])``: ``S``
  steps fused into one compiled call. ``data`` (replicated) holds the uint8 ``image`` / ``label``
  (and ``outlier``) pools; the index arrays are split over devices along their batch axis. With
  ``padded``, negative ID indices are padding (an epoch's last partial batch). Where
  :func:`fixed_length_calls`, rows of :data:`SKIP_STEP` after the real steps are not run (their
  metrics are 0): :func:`pad_call` fits a shorter call to the program of the longest.

  Built once per ``(config, mesh, padded)``: every call of a run, and anything compiled ahead
  for it (``fn.lower(...).compile()``), is the same executable.
  """
  return _device_epoch_fn(hashable_config(config), mesh, padded)


def host_step_fn(config, mesh) -> Callable:
  """``fn(state, batch) -> (state, metrics)`` for batches already sharded over the mesh."""
  step = functools.partial(train_step, config=config)
  return parallel.data_parallel(step, mesh, in_specs=(P(), P(parallel.AXIS)),
                                out_specs=(P(), P()), donate_argnums=(0,))


def fused_steps(steps: int, steps_per_call: int) -> int:
  """Steps per compiled call: a divisor of the epoch near ``steps_per_call`` when there is
  one (every call then has the same shape and the loop compiles once), else ``steps_per_call``."""
  limit = max(1, min(steps_per_call, steps))
  divisor = max(d for d in range(1, limit + 1) if steps % d == 0)
  return divisor if 2 * divisor >= limit else limit


def epoch_calls(steps: int, steps_per_call: int) -> List[slice]:
  """The step ranges of one epoch's compiled calls (see :func:`fused_steps`)."""
  chunk = fused_steps(steps, steps_per_call)
  return [slice(s0, min(s0 + chunk, steps)) for s0 in range(0, steps, chunk)]
