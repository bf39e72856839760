"""Training: pretraining with cross-entropy, energy-bounded fine-tuning, Outlier Exposure.

``train_step(state, batch) -> (state, metrics)`` is the per-device step (pmapped
style: gradients and metrics averaged with ``lax.pmean`` over ``parallel.AXIS``).
In-distribution and outlier images go through the network in ONE forward pass,
so BatchNorm sees all ``128 + 256`` images, as in the reference. The optimiser is
``torch.optim.SGD(nesterov=True, momentum=0.9, weight_decay=5e-4)``: the decay is
added to the gradient of every parameter before momentum.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from energy_jax import (augment, checkpoints, datasets, inference, losses, models, parallel, scores,
                        summary_writer)

Array = jax.Array
OBJECTIVES = ("ce", "energy", "oe")
# XLA:CPU runs convolutions inside a while loop ~30x slower: unroll the fused steps there.
UNROLL = None


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue exactly: weights, BN statistics, optimiser, step, rng."""
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: Array

  @property
  def variables(self):
    """``{'params', 'batch_stats'}`` for ``model.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}


make_model = models.from_config


def cosine_schedule(base_lr: float, total_steps: int, min_lr_ratio: float = 1e-6) -> optax.Schedule:
  """``lr(k) = lr_min + (lr - lr_min) * (1 + cos(pi * (k + 1) / total)) / 2``.

  ``k + 1``: the reference calls ``scheduler.step()`` before ``optimizer.step()``,
  so its first update already uses the step-1 rate.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  lr_min = base_lr * min_lr_ratio

  def schedule(count):
    frac = jnp.minimum(count + 1, total_steps) / total_steps
    return lr_min + (base_lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return schedule


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """SGD with nesterov momentum and L2 weight decay on every parameter, cosine per step."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(cosine_schedule(config.learning_rate, total_steps, config.min_lr_ratio),
                momentum=config.momentum, nesterov=config.nesterov))


def create_train_state(config, rng: Array, total_steps: int,
                       variables: Optional[Mapping[str, Any]] = None) -> TrainState:
  """A fresh state (or one around ``variables``, e.g. pretrained weights) with a new optimiser.

  One compiled program: built op by op, the initialisation, optimiser state and copies compiled
  ~20 small programs each run (0.7 s on 2 CPU cores, ~3 s of the H200 run's set-up).
  :func:`compile_ahead` compiles it early.
  """
  if variables is not None:
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  return _create_train_state(frozen(config), rng, total_steps, variables)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _create_train_state(config, rng: Array, total_steps: int, variables) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  if variables is None:
    variables = models.init_variables(make_model(config), init_rng)
  tx = make_optimizer(config, total_steps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    rng=state_rng)


def frozen(config) -> ml_collections.FrozenConfigDict:
  """``config`` as a hashable, immutable value: a static argument or cache key of the compiled
  functions built from it (equal contents, equal keys)."""
  return ml_collections.FrozenConfigDict(config)


def objective_loss(config, logits: Array, labels: Array, num_in: int):
  """The training objective on logits of ``[in; out]`` images, and its parts."""
  logits_in, logits_out = logits[:num_in], logits[num_in:]
  ce = jnp.mean(losses.softmax_cross_entropy(logits=logits_in, labels=labels))
  metrics = {"ce": ce}
  loss = ce
  if config.score == "energy":
    reg = losses.energy_bounded_loss(logits_in=logits_in, logits_out=logits_out,
                                     m_in=config.m_in, m_out=config.m_out)
    loss = ce + config.energy_weight * reg
    metrics.update(energy_reg=reg, energy_in=jnp.mean(scores.free_energy(logits_in)),
                   energy_out=jnp.mean(scores.free_energy(logits_out)))
  elif config.score == "oe":
    reg = losses.outlier_exposure_loss(logits_out=logits_out)
    loss = ce + config.oe_weight * reg
    metrics["oe_reg"] = reg
  metrics["loss"] = loss
  metrics["accuracy"] = jnp.mean(jnp.argmax(logits_in, -1) == labels)
  return loss, metrics


def train_step(state: TrainState, batch: Mapping[str, Array], *, config,
               tx: optax.GradientTransformation, axis_name: Optional[str] = parallel.AXIS
               ) -> Tuple[TrainState, Dict[str, Array]]:
  """One SGD step on this device's shard; ``batch`` has ``image``, ``label`` and, for
  the energy / OE objectives, ``outlier`` (normalised NHWC float images)."""
  model = make_model(config, axis_name=axis_name)
  num_in = batch["image"].shape[0]
  images = batch["image"]
  if config.score != "ce":
    images = jnp.concatenate([images, batch["outlier"].astype(images.dtype)], axis=0)
  rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, lax.axis_index(axis_name))

  def loss_fn(params):
    logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                   train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    loss, metrics = objective_loss(config, logits, batch["label"], num_in)
    return loss, (new_vars["batch_stats"], metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, metrics = lax.pmean((grads, metrics), axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


# ----------------------------------------------------------------------------------------------
# The device-resident path: data on the device as uint8, augmentation inside the compiled step,
# ``steps_per_call`` steps fused into one ``lax.scan``.


def device_batch(rng: Array, data: Mapping[str, Array], in_idx: Array,
                 out_idx: Optional[Array], dtype) -> Dict[str, Array]:
  """Gathers this device's indices from the device-resident data and augments them."""
  k_in, k_out = jax.random.split(rng)
  batch = {"image": augment.normalize(augment.random_crop_flip(k_in, data["image"][in_idx]),
                                      dtype),
           "label": data["label"][in_idx]}
  if out_idx is not None:
    batch["outlier"] = augment.normalize(
        augment.random_crop_flip(k_out, data["outlier"][out_idx]), dtype)
  return batch


def make_device_train_fn(config, tx, mesh) -> Callable:
  """``fn(state, data, in_idx [S, B], out_idx [S, B_out]) -> (state, metrics [S])``, compiled once.

  ``data`` (replicated) holds ``image``/``label`` and, if needed, ``outlier`` uint8 pools;
  the index arrays are split over devices along their batch axis.
  """
  dtype = make_model(config).dtype
  uses_outliers = config.score != "ce"

  def per_device(state, data, in_idx, out_idx):
    def body(state, idx):
      i_in, i_out = idx
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                               lax.axis_index(parallel.AXIS) + 7919)
      batch = device_batch(rng, data, i_in, i_out if uses_outliers else None, dtype)
      return train_step(state, batch, config=config, tx=tx)
    return lax.scan(body, state, (in_idx, out_idx),
                    unroll=UNROLL if UNROLL is not None else jax.default_backend() == "cpu")

  spec_idx = P(None, parallel.AXIS)
  return parallel.data_parallel(per_device, mesh, in_specs=(P(), P(), spec_idx, spec_idx),
                                out_specs=(P(), P()), donate_argnums=(0,))


def epoch_calls(steps: int, steps_per_call: int) -> List[slice]:
  """The step ranges of one epoch's compiled calls (see :func:`fused_steps`)."""
  chunk = fused_steps(steps, steps_per_call)
  return [slice(s0, min(s0 + chunk, steps)) for s0 in range(0, steps, chunk)]


def steps_per_epoch(num_train: int, batch_size: int, source: str) -> int:
  """Full batches per epoch (the remainder is dropped); raises if there is none."""
  if num_train < batch_size:
    raise ValueError(f"{source} has {num_train} images, fewer than one batch of {batch_size}")
  return num_train // batch_size


def device_data(images, labels, outliers=None) -> Dict[str, Any]:
  """The device-resident pools :func:`make_device_train_fn` gathers from (arrays or shapes)."""
  data = {"image": images, "label": labels}
  if outliers is not None:
    data["outlier"] = outliers
  return data


def fused_steps(steps: int, steps_per_call: int) -> int:
  """Steps per compiled call: a divisor of the epoch near ``steps_per_call`` when there is
  one (every call then has the same shape and the loop compiles once), else ``steps_per_call``."""
  limit = max(1, min(steps_per_call, steps))
  divisor = max(d for d in range(1, limit + 1) if steps % d == 0)
  return divisor if 2 * divisor >= limit else limit


def _mesh_of(config):
  """The run's 1-D mesh: ``config.num_devices`` devices, or all of them when 0 / unset."""
  return parallel.make_mesh(config.get("num_devices") or None)


def device_epoch_fn(config, total_steps: int, mesh) -> Callable:
  """:func:`make_device_train_fn` with the run's optimiser, built once per ``(config,
  total_steps, mesh)`` in a process. What :func:`compile_ahead` compiled is then the very
  function :func:`train_and_evaluate` calls: no retracing, no compiling, no cache loading
  (on the H200 the first epoch took ~3 s longer than the others for those)."""
  return _device_epoch_fn(frozen(config), total_steps, mesh, UNROLL)


@functools.lru_cache(maxsize=4)
def _device_epoch_fn(config, total_steps: int, mesh, unroll) -> Callable:
  del unroll                       # part of the key: make_device_train_fn reads UNROLL
  return make_device_train_fn(config, make_optimizer(config, total_steps), mesh)


def compile_ahead(config, num_train: int, num_outliers: int = 0) -> None:
  """Compiles what :func:`train_and_evaluate` runs for ``config`` before its first epoch: the
  state's creation (fresh, or around pretrained weights) and every call shape of the
  device-resident epoch over ``num_train`` training images (after ``train_subset``;
  :func:`dataset_sizes` counts them without decoding).

  The run in this process then reuses the executables (:func:`device_epoch_fn`). Meant for a
  thread that compiles while the data decode or an earlier stage trains
  (``benchmarks/reproduce.py --overlap-compile``); :func:`compile_evaluation` is the test set's.
  """
  if config.input_pipeline != "device":
    raise ValueError("compile_ahead covers the device-resident input path only, not "
                     f"config.input_pipeline = {config.input_pipeline!r}")
  mesh = _mesh_of(config)
  steps = steps_per_epoch(num_train, config.batch_size, "the training set")
  total_steps = steps * config.epochs
  # Shapes without a placement, as the run's key and loaded weights (host arrays) have none.
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))   # the shape of the configured PRNG's key
  variables = _variable_shapes(config) if config.pretrained else None
  create = _create_train_state.lower(frozen(config), key, total_steps, variables)
  rep = parallel.replicated(mesh)
  state = parallel.abstract(create.out_info, rep)       # the state's shapes, as created
  uses_outliers = config.score != "ce"
  data = parallel.abstract(device_data(
      jax.ShapeDtypeStruct((num_train, 32, 32, 3), jnp.uint8),
      jax.ShapeDtypeStruct((num_train,), jnp.int32),
      jax.ShapeDtypeStruct((num_outliers, 32, 32, 3), jnp.uint8) if uses_outliers else None),
      rep)
  out_batch = config.outlier_batch_size if uses_outliers else 0
  fn = device_epoch_fn(config, total_steps, mesh)
  # The state's creation compiles beside the epoch (XLA compiles without the GIL): on a GPU its
  # initialising forward pass has convolutions of its own to autotune.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    create_compiled = pool.submit(create.compile)
    for length in sorted({sl.stop - sl.start
                          for sl in epoch_calls(steps, config.steps_per_call)}):
      fn.lower(state, data, jax.ShapeDtypeStruct((length, config.batch_size), jnp.int32),
               jax.ShapeDtypeStruct((length, out_batch), jnp.int32)).compile()
    create_compiled.result()       # re-raises its error, if any


def compile_evaluation(config, num_test: int) -> None:
  """Compiles the test-set evaluation of :func:`train_and_evaluate` (``num_test`` images)."""
  mesh = _mesh_of(config)
  inference.compile_predict(make_model(config), _variable_shapes(config), num_test,
                            config.eval_batch_size, mesh)


def _variable_shapes(config):
  return jax.eval_shape(lambda: models.init_variables(make_model(config), jax.random.PRNGKey(0)))


class BackgroundCompile(threading.Thread):
  """Runs compile jobs one after the other in a daemon thread (XLA compiles without holding
  the GIL, so the main thread decodes data or trains meanwhile). ``wait(i)`` blocks until job
  ``i`` is done and re-raises, in the caller's thread, the error of job ``i`` or of an earlier
  job (after a failure the later jobs do not run)."""

  def __init__(self, jobs: List[Callable[[], None]]):
    super().__init__(daemon=True)
    self.jobs = list(jobs)
    self.done = [threading.Event() for _ in self.jobs]
    self.seconds = [0.0] * len(self.jobs)
    self.error: Optional[BaseException] = None
    self.failed_job: Optional[int] = None
    self.start()

  def run(self):
    for i, job in enumerate(self.jobs):
      t0 = time.time()
      try:
        job()
      except BaseException as e:  # re-raised by wait()
        self.error, self.failed_job = e, i
        for event in self.done[i:]:
          event.set()
        return
      self.seconds[i] = time.time() - t0
      self.done[i].set()

  def wait(self, i: int = -1) -> float:
    """Blocks until job ``i`` (default: the last) is compiled; returns the seconds waited."""
    i = i % len(self.jobs)
    t0 = time.time()
    self.done[i].wait()
    if self.failed_job is not None and self.failed_job <= i:
      raise RuntimeError(f"compiling in the background failed (job {self.failed_job}"
                         f"{'' if self.failed_job == i else f', before job {i}'})") from self.error
    return time.time() - t0


def _sources(config):
  """``(source, split)`` of the training set, the test set and the outliers (None without an
  outlier objective): one definition for loading and for counting without loading."""
  return ((config.in_train, config.get("in_train_split", "train")),
          (config.in_test, config.get("in_test_split", "test")),
          (config.outliers, config.get("outliers_split") or None) if config.score != "ce"
          else None)


def dataset_sizes(config) -> Tuple[int, int, int]:
  """``(train after train_subset, test, outliers or 0)`` image counts of ``config``'s sources,
  read from their listings without decoding (:func:`datasets.count_source`)."""
  train_src, test_src, outlier_src = _sources(config)
  num_train = datasets.count_source(*train_src)
  if config.train_subset:
    num_train = min(num_train, config.train_subset)
  num_outliers = datasets.count_source(*outlier_src) if outlier_src else 0
  return num_train, datasets.count_source(*test_src), num_outliers


def make_host_train_fn(config, tx, mesh) -> Callable:
  """``fn(state, batch) -> (state, metrics)`` for batches already sharded over the mesh."""
  step = functools.partial(train_step, config=config, tx=tx)
  return parallel.data_parallel(step, mesh, in_specs=(P(), P(parallel.AXIS)),
                                out_specs=(P(), P()), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The run: resume from the run's own checkpoint first, else load the pretrained model, else start
# fresh; then one device-resident (or tf.data) epoch after another, evaluated and checkpointed.


def load_datasets(config, cache: Optional[Dict[Tuple[str, Optional[str]], Any]] = None):
  """``(train, test, outliers or None)`` as in-memory :class:`~energy_jax.datasets.ImageSet`.

  ``cache``: a dict the caller keeps between runs of one process (e.g. pretraining then
  fine-tuning on the same data), keyed by ``(source, split)``, so each source is decoded once.
  """
  train_src, test_src, outlier_src = _sources(config)
  train = datasets.load_source_cached(cache, *train_src)
  test = datasets.load_source_cached(cache, *test_src)
  for name, ds in (("in_train", train), ("in_test", test)):
    if ds.num_classes != config.num_classes:
      raise ValueError(f"config.{name} = {ds.source} has {ds.num_classes} classes, but "
                       f"config.num_classes = {config.num_classes}")
  if config.train_subset:
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(train))[:config.train_subset])
    train = datasets.ImageSet(train.images[keep], train.labels[keep],
                              train.class_names, train.source + f"[subset {len(keep)}]")
  outliers = None
  if outlier_src:
    outliers = datasets.load_source_cached(cache, *outlier_src)
    if len(outliers) < config.outlier_batch_size:
      raise ValueError(f"outlier source {outliers.source} has {len(outliers)} images, fewer "
                       f"than one batch of {config.outlier_batch_size}")
  return train, test, outliers


def epoch_indices(seed: int, epoch: int, num_train: int, batch: int, num_out: int,
                  out_batch: int) -> Tuple[np.ndarray, np.ndarray]:
  """Shuffled ID indices ``[steps, batch]`` (remainder dropped) and outlier indices
  ``[steps, out_batch]`` (fresh permutations of the pool, concatenated as needed).
  A function of ``(seed, epoch)`` only, so a resumed run draws what it would have drawn."""
  rng = np.random.default_rng([seed, epoch])
  steps = num_train // batch
  in_idx = rng.permutation(num_train)[:steps * batch].reshape(steps, batch)
  if not num_out:
    return in_idx.astype(np.int32), np.zeros((steps, 0), np.int32)
  need = steps * out_batch
  pool = np.concatenate([rng.permutation(num_out) for _ in range(-(-need // num_out))])
  return in_idx.astype(np.int32), pool[:need].reshape(steps, out_batch).astype(np.int32)


def _meta(config, epoch: int, finished: bool, row: Dict[str, float]) -> Dict[str, Any]:
  return {"epoch": epoch, "finished": finished, "architecture": checkpoints.architecture(config),
          "score": config.score, "results": row}


def _initial_state(config, workdir: str, ckpts, total_steps: int, log):
  """Resume first, then the pretrained model, else a fresh model (pretraining only)."""
  rng = jax.random.PRNGKey(config.seed)
  latest = ckpts.latest_epoch()
  if latest is not None:
    meta = ckpts.read_meta(latest)
    checkpoints._check_architecture(meta.get("architecture", {}), config, ckpts.directory)
    if meta.get("finished"):
      raise FileExistsError(
          f"{workdir} holds a finished run (epoch {latest + 1} of {config.epochs}); choose "
          f"another --workdir, or delete {ckpts.directory} to start over")
    template = create_train_state(config, rng, total_steps)
    state, _ = ckpts.restore(template, latest)
    log(f"resuming {workdir} after epoch {latest + 1}")
    return state, latest + 1
  if config.pretrained:
    variables = checkpoints.load_variables(config.pretrained, config)
    log(f"loaded pretrained weights from {config.pretrained}")
    return create_train_state(config, rng, total_steps, variables), 0
  if config.score != "ce":
    raise ValueError("fine-tuning needs a pretrained model: set --config.pretrained to a run "
                     "directory of experiments/pretrain.py or a reference .pt file")
  return create_train_state(config, rng, total_steps), 0


def _drop_log_rows_after(csv_path: str, jsonl_path: str, epochs_done: int):
  """On resume: rows of epochs after the restored checkpoint are run again, so drop them, and a
  row a kill cut short (it cannot be parsed) with them."""
  def epoch_of_csv(line):
    fields = line.split(",")
    return int(fields[0]) if len(fields) == 5 and fields[0].isdigit() else None

  def epoch_of_json(line):
    try:
      return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
      return None

  for path, epoch_of, header in ((csv_path, epoch_of_csv, 1), (jsonl_path, epoch_of_json, 0)):
    if not os.path.exists(path):
      continue
    with open(path) as f:
      lines = f.read().splitlines()
    epochs = [epoch_of(l) for l in lines[header:]]
    keep = lines[:header] + [l for l, e in zip(lines[header:], epochs)
                             if e is not None and e <= epochs_done]
    with open(path, "w") as f:
      f.write("".join(l + "\n" for l in keep))


def train_and_evaluate(config, workdir: str, log: Callable[[str], None] = print,
                       data_cache: Optional[Dict[Tuple[str, Optional[str]], Any]] = None
                       ) -> Dict[str, Any]:
  """Trains per ``config`` in ``workdir``; returns the last epoch's results row.

  Each epoch appends a row (epoch, seconds, train loss, test loss, test error %) to
  ``workdir/training_results.csv`` and ``results.jsonl`` (and, with ``config.tensorboard``, its
  scalars to ``workdir/tensorboard``); the test set is evaluated every
  ``config.eval_every_epochs`` epochs and after the last (other rows leave the test columns
  empty), and a checkpoint is saved every ``config.checkpoint_every_epochs`` and after the last.
  The same command continues a killed run at the next saved epoch with identical results.
  ``data_cache``: see :func:`load_datasets`.
  """
  if config.score not in OBJECTIVES:
    raise ValueError(f"unknown config.score {config.score!r}; choose one of {OBJECTIVES}")
  os.makedirs(workdir, exist_ok=True)
  mesh = _mesh_of(config)
  per_dev = parallel.check_divisible(config.batch_size, mesh)
  if config.score != "ce":
    parallel.check_divisible(config.outlier_batch_size, mesh, "outlier batch size")

  eval_every = int(config.get("eval_every_epochs", 1))
  if eval_every < 1:
    raise ValueError(f"config.eval_every_epochs must be >= 1, got {eval_every}")
  t_data = time.time()
  train, test, outliers = load_datasets(config, data_cache)
  t_data = time.time() - t_data
  t_setup = time.time()
  steps = steps_per_epoch(len(train), config.batch_size, train.source)
  total_steps = steps * config.epochs
  ckpts = checkpoints.RunCheckpoints(workdir, config.keep_checkpoints,
                                     config.checkpoint_every_epochs)
  scalars = None
  try:
    state, start_epoch = _initial_state(config, workdir, ckpts, total_steps, log)
    state = parallel.put_replicated(state, mesh)
    log(f"{config.score} training: {len(train)} train / {len(test)} test images"
        f"{f', {len(outliers)} outliers' if outliers is not None else ''}; {steps} steps/epoch, "
        f"{mesh.devices.size} device(s) x {per_dev}, input {config.input_pipeline}; "
        f"data loaded in {t_data:.1f} s")

    if config.input_pipeline == "device":
      data = device_data(train.images, train.labels,
                         outliers.images if outliers is not None else None)
      data = jax.block_until_ready(parallel.put_replicated(data, mesh))
      run_steps = device_epoch_fn(config, total_steps, mesh)
    elif config.input_pipeline == "tfdata":
      from energy_jax import input_pipeline
      run_host = make_host_train_fn(config, make_optimizer(config, total_steps), mesh)
    else:
      raise ValueError(f"unknown config.input_pipeline {config.input_pipeline!r} "
                       "(choose 'device' or 'tfdata')")

    t_setup = time.time() - t_setup     # model / checkpoint state, data onto the devices
    csv_path = os.path.join(workdir, "training_results.csv")
    jsonl_path = os.path.join(workdir, "results.jsonl")
    if start_epoch == 0 or not os.path.exists(csv_path):
      with open(csv_path, "w") as f:
        f.write("epoch,time(s),train_loss,test_loss,test_error(%)\n")
      open(jsonl_path, "w").close()
    else:
      _drop_log_rows_after(csv_path, jsonl_path, start_epoch)
    eval_model = make_model(config)
    scalars = summary_writer.open_for_run(config, workdir, log)
    lr_at = cosine_schedule(config.learning_rate, total_steps, config.min_lr_ratio)
    rows: List[Dict[str, Any]] = []
    images_per_step = config.batch_size + (config.outlier_batch_size if outliers is not None else 0)
    for epoch in range(start_epoch, config.epochs):
      t0 = time.time()
      in_idx, out_idx = epoch_indices(config.seed, epoch, len(train), config.batch_size,
                                      len(outliers) if outliers is not None else 0,
                                      config.outlier_batch_size)
      losses_per_step, extra = [], {}
      bar = _progress(steps, f"epoch {epoch + 1}/{config.epochs}", config)
      if config.input_pipeline == "device":
        for sl in epoch_calls(steps, config.steps_per_call):
          state, m = run_steps(state, data, in_idx[sl], out_idx[sl])
          m = jax.device_get(m)
          losses_per_step.extend(np.asarray(m["loss"]).tolist())
          extra = {k: float(np.mean(v)) for k, v in m.items()}
          bar.update(sl.stop - sl.start)
          bar.set_postfix(img_s=f"{bar.n * images_per_step / max(time.time() - t0, 1e-9):.0f}")
      else:
        stream = input_pipeline.epoch_stream(train, outliers, in_idx, out_idx, seed=config.seed,
                                             epoch=epoch)
        for batch in stream:
          state, m = run_host(state, parallel.put_sharded(batch, mesh))
          m = jax.device_get(m)
          losses_per_step.append(float(m["loss"]))
          extra = {k: float(v) for k, v in m.items()}
          bar.update(1)
      bar.close()
      losses_np = np.asarray(losses_per_step)
      if not np.all(np.isfinite(losses_np)):
        bad = int(np.flatnonzero(~np.isfinite(losses_np))[0])
        last = ckpts.latest_epoch()
        raise FloatingPointError(
            f"training loss became {losses_np[bad]} at epoch {epoch + 1}, step {bad + 1}; "
            f"nothing of this epoch was saved, the last good checkpoint is "
            f"{f'epoch {last + 1} in {ckpts.directory}' if last is not None else 'none yet'}")
      ema = 0.0
      for value in losses_np:          # the reference's running average of the train loss
        ema = 0.8 * ema + 0.2 * value
      t_train = time.time() - t0
      finished = epoch + 1 == config.epochs
      row = {"epoch": epoch + 1, "train_loss": ema,
             **{f"last_{k}": v for k, v in extra.items()}}
      if finished or (epoch + 1) % eval_every == 0:
        logits, _ = inference.predict(eval_model, state.variables, test.images,
                                      config.eval_batch_size, mesh)
        test_ce = np.asarray(losses.softmax_cross_entropy(logits=logits, labels=test.labels))
        row["test_loss"] = float(test_ce.mean())
        row["test_error"] = 100.0 * float(np.mean(logits.argmax(-1) != test.labels))
      row.update(time_s=time.time() - t0, train_s=t_train, eval_s=time.time() - t0 - t_train)
      rows.append(row)
      if finished or ckpts.should_save(epoch):
        # Only then is the state copied off the device.
        ckpts.save(epoch, jax.device_get(state), _meta(config, epoch, finished, row),
                   force=finished)
      with open(csv_path, "a") as f:
        f.write("%03d,%05d,%0.6f,%s,%s\n" % (
            epoch + 1, row["time_s"], ema,
            "%0.5f" % row["test_loss"] if "test_loss" in row else "",
            "%0.2f" % row["test_error"] if "test_error" in row else ""))
      with open(jsonl_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if scalars is not None:
        # Step = epoch, as the CSV; the rate is that of the epoch's last update.
        scalars.write(epoch + 1, {
            "train/loss": ema, **{f"train/last_{k}": v for k, v in extra.items()},
            **{f"test/{k[5:]}": row[k] for k in ("test_loss", "test_error") if k in row},
            "learning_rate": float(lr_at((epoch + 1) * steps - 1)), "epoch_seconds": row["time_s"]})
      line = "Epoch {:3d} | Time {:5d} | Train Loss {:.4f}".format(epoch + 1, int(row["time_s"]),
                                                                    ema)
      if "test_loss" in row:
        line += " | Test Loss {:.3f} | Test Error {:.2f}".format(row["test_loss"],
                                                                 row["test_error"])
      log(line)
    if rows:
      then = (f"then {np.mean([r['train_s'] for r in rows[1:]]):.2f} s/epoch training, "
              if len(rows) > 1 else "")
      log(f"time: data {t_data:.1f} s, setup {t_setup:.1f} s, first epoch "
          f"{rows[0]['train_s']:.1f} s (incl. compile), {then}evaluation "
          f"{sum(r['eval_s'] for r in rows):.1f} s in all")
  finally:
    ckpts.close()
    if scalars is not None:
      scalars.close()
  return rows[-1] if rows else {}


def _progress(total: int, desc: str, config):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="step", leave=False,
              disable=not config.get("progress_bar", True))
