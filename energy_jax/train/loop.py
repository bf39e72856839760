"""The run: resume from the run's own checkpoint, else start from the pretrained model, else fresh;
then per epoch: train, evaluate the test set, save, write."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from energy_jax import (checkpoints, config as config_lib, distributed, inference, losses, models,
                        parallel, progress)
from energy_jax.data import host_stream_available, load_run_data, sampling
from energy_jax.data.run_data import RunData
from energy_jax.train import objectives
from energy_jax.train.optim import make_optimizer
from energy_jax.train.state import TrainState, create_train_state
from energy_jax.train.step import (device_data, device_epoch_fn, epoch_calls, host_step_fn,
                                   step_indices_spec)
from energy_jax.train.writer import open_run_writer

INPUT_PIPELINES = ("device", "tfdata")


def train_and_evaluate(config, workdir: str, log: Callable[[str], None] = print,
                       data_cache: Optional[Dict] = None) -> Dict[str, Any]:
  """Trains per ``config`` in ``workdir``; returns the last epoch's row.

  Each epoch writes a row (:class:`~energy_jax.train.writer.RunWriter`); the test set is
  evaluated every ``config.eval_every_epochs`` epochs and after the last, a checkpoint is saved
  every ``config.checkpoint_every_epochs`` and after the last. The same command continues a
  killed run at the next saved epoch with identical results. ``data_cache``: see
  :func:`energy_jax.data.load_run_data`.
  """
  objective, mesh = check_config(config)
  log = distributed.main_process_only(log)
  log(f"config of {workdir}:\n{config}")
  t0 = time.time()
  data = load_run_data(config, objective.uses_outliers, data_cache)
  steps = sampling.steps_per_epoch(len(data.train), config.batch_size, config.drop_remainder,
                                   data.train.source)
  total_steps = steps * config.epochs
  learning_rate = make_optimizer(config, total_steps).learning_rate
  times = {"data": time.time() - t0}
  row: Dict[str, Any] = {}
  with checkpoints.RunCheckpoints(workdir, config.keep_checkpoints,
                                  config.checkpoint_every_epochs) as ckpts:
    state, start_epoch = initial_state(config, workdir, ckpts, total_steps, log, mesh)
    state = parallel.put_replicated(state, mesh)
    run_epoch = epoch_runner(config, data, mesh, total_steps, steps)
    times["setup"] = time.time() - t0 - times["data"]
    log(f"{config.objective} training: {len(data.train)} train / {len(data.test)} test images"
        f"{f', {len(data.outliers)} outliers' if data.outliers is not None else ''}; {steps} "
        f"steps/epoch, {mesh.devices.size} device(s) x {config.batch_size // mesh.devices.size}, "
        f"input {config.input_pipeline}; data loaded in {times['data']:.1f} s")
    with open_run_writer(config, workdir, start_epoch, log) as writer:
      for epoch in range(start_epoch, config.epochs):
        t_epoch = time.time()
        state, metrics = run_epoch(state, epoch)
        check_finite(metrics["loss"], epoch, ckpts)
        finished = epoch + 1 == config.epochs
        row = {"epoch": epoch + 1, "train_loss": reference_average(metrics["loss"]),
               **{f"mean_{k}": float(np.mean(v)) for k, v in metrics.items()},
               "learning_rate": float(learning_rate((epoch + 1) * steps - 1)),
               "train_s": time.time() - t_epoch}
        if finished or (epoch + 1) % config.eval_every_epochs == 0:
          row.update(test_metrics(config, state, data.test, mesh))
        row.update(time_s=time.time() - t_epoch, eval_s=time.time() - t_epoch - row["train_s"])
        if finished or ckpts.should_save(epoch):    # only then is the state copied off the device
          ckpts.save(epoch, jax.device_get(state),
                     checkpoints.run_meta(config, epoch, finished, row), force=finished)
        writer.write(row)
        times.setdefault("first_epoch", row["train_s"])
  log(timing_summary(times, t0))
  return row


def check_config(config):
  """``(objective, mesh)`` of ``config``, after checking what must hold before any work."""
  config_lib.validate(config)
  objective = objectives.get(config.objective)
  models.get(config.model.name)
  if config.input_pipeline not in INPUT_PIPELINES:
    raise ValueError(f"unknown config.input_pipeline {config.input_pipeline!r} "
                     f"(choose one of {INPUT_PIPELINES})")
  if int(config.eval_every_epochs) < 1:
    raise ValueError(f"config.eval_every_epochs must be >= 1, got {config.eval_every_epochs}")
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_divisible(config.batch_size, mesh)
  if objective.uses_outliers:
    parallel.check_divisible(config.outlier_batch_size, mesh, "outlier batch size")
  return objective, mesh


def initial_state(config, workdir: str, ckpts: checkpoints.RunCheckpoints, total_steps: int,
                  log: Callable[[str], None], mesh=None) -> Tuple[TrainState, int]:
  """``(state, first epoch)``: the run's own latest checkpoint (restored onto ``mesh``,
  replicated), else the pretrained model, else a fresh model (pretraining only)."""
  rng = jax.random.PRNGKey(config.seed)
  latest = ckpts.latest_epoch()
  if latest is not None:
    meta = ckpts.read_meta(latest)
    models.check_architecture(checkpoints.architecture_of(meta), config, ckpts.directory)
    if meta.get("format") != checkpoints.RUN_FORMAT:
      raise ValueError(
          f"{workdir} holds a run saved by energy-jax {meta.get('version', '0.1')} (run format "
          f"{meta.get('format', 1)}), whose training numbers differ from this version's (format "
          f"{checkpoints.RUN_FORMAT}); finish it with that version, or start a new --workdir")
    if meta.get("finished"):
      raise FileExistsError(
          f"{workdir} holds a finished run (epoch {latest + 1} of {config.epochs}); choose "
          f"another --workdir, or delete {ckpts.directory} to start over")
    state, _ = ckpts.restore(create_train_state(config, rng, total_steps), latest,
                             parallel.replicated(mesh) if mesh is not None else None)
    log(f"resuming {workdir} after epoch {latest + 1}")
    return state, latest + 1
  if config.pretrained:
    variables = checkpoints.load_variables(config.pretrained, config)
    log(f"loaded pretrained weights from {config.pretrained}")
    return create_train_state(config, rng, total_steps, variables), 0
  if objectives.get(config.objective).uses_outliers:
    raise ValueError("fine-tuning needs a pretrained model: set --config.pretrained to a run "
                     "directory of experiments/pretrain.py or a reference .pt file")
  return create_train_state(config, rng, total_steps), 0


EpochRunner = Callable[[TrainState, int], Tuple[TrainState, Dict[str, np.ndarray]]]


def epoch_runner(config, data: RunData, mesh, total_steps: int, steps: int) -> EpochRunner:
  """``run(state, epoch) -> (state, {metric: [steps] values})``: one epoch on either input path,
  the images of each step drawn by :func:`energy_jax.data.sampling.epoch_indices`."""
  num_out = len(data.outliers) if data.outliers is not None else 0
  padded = sampling.has_partial_batch(len(data.train), config.batch_size, config.drop_remainder)

  def indices(epoch):
    return sampling.epoch_indices(config.seed, epoch, len(data.train), config.batch_size,
                                  num_out, config.outlier_batch_size,
                                  drop_remainder=config.drop_remainder,
                                  outlier_sampling=config.outlier_sampling)

  if config.input_pipeline == "device":
    fn = device_epoch_fn(config, total_steps, mesh, padded)
    pools = jax.block_until_ready(parallel.put_replicated(device_data(
        data.train.images, data.train.labels,
        data.outliers.images if data.outliers is not None else None), mesh))

    def calls(state, epoch):
      in_idx, out_idx = indices(epoch)
      for sl in epoch_calls(steps, config.steps_per_call):
        idx = parallel.put_global((in_idx[sl], out_idx[sl]), mesh, step_indices_spec())
        state, m = fn(state, pools, *idx)
        yield state, jax.device_get(m), sl.stop - sl.start
  else:
    if not host_stream_available():
      raise ImportError("config.input_pipeline = 'tfdata' needs TensorFlow (pip install "
                        "'energy_jax[train]'), or use the device input pipeline")
    from energy_jax.data import host_stream
    step = host_step_fn(config, total_steps, mesh)

    def calls(state, epoch):
      in_idx, out_idx = indices(epoch)
      for batch in host_stream.epoch_stream(data.train, data.outliers, in_idx, out_idx,
                                            seed=config.seed, epoch=epoch, padded=padded):
        state, m = step(state, parallel.put_sharded(batch, mesh))
        yield state, jax.tree_util.tree_map(lambda v: np.asarray(v)[None], jax.device_get(m)), 1

  images_per_step = config.batch_size + (config.outlier_batch_size if num_out else 0)

  def run(state, epoch):
    parts, t0 = [], time.time()
    bar = progress.bar(steps, f"epoch {epoch + 1}/{config.epochs}", config.progress_bar, "step")
    for state, m, n in calls(state, epoch):
      parts.append(m)
      bar.update(n)
      bar.set_postfix(img_s=f"{bar.n * images_per_step / max(time.time() - t0, 1e-9):.0f}")
    bar.close()
    return state, {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
  return run


def check_finite(step_losses: np.ndarray, epoch: int, ckpts: checkpoints.RunCheckpoints):
  """Stops the run at a non-finite training loss, before anything of the epoch is saved."""
  if not np.all(np.isfinite(step_losses)):
    bad = int(np.flatnonzero(~np.isfinite(step_losses))[0])
    last = ckpts.latest_epoch()
    raise FloatingPointError(
        f"training loss became {step_losses[bad]} at epoch {epoch + 1}, step {bad + 1}; "
        f"nothing of this epoch was saved, the last good checkpoint is "
        f"{f'epoch {last + 1} in {ckpts.directory}' if last is not None else 'none yet'}")


def reference_average(step_losses: np.ndarray) -> float:
  """The reference's running average of the training loss over an epoch (0.8 / 0.2)."""
  average = 0.0
  for value in np.asarray(step_losses).tolist():     # Python floats: float64 as the reference
    average = 0.8 * average + 0.2 * value
  return average


def test_metrics(config, state: TrainState, test, mesh) -> Dict[str, float]:
  """``test_loss`` (mean cross-entropy) and ``test_error`` (%) of ``state`` on the test set."""
  logits = inference.predict(models.from_config(config), state.variables, test.images,
                             config.eval_batch_size, mesh).logits
  ce = np.asarray(losses.softmax_cross_entropy(logits=logits, labels=test.labels))
  return {"test_loss": float(ce.mean()),
          "test_error": 100.0 * float(np.mean(logits.argmax(-1) != test.labels))}


def timing_summary(times: Dict[str, float], t0: float) -> str:
  return (f"time: data {times['data']:.1f} s, setup {times.get('setup', 0.0):.1f} s, first epoch "
          f"{times.get('first_epoch', 0.0):.1f} s (incl. compile), {time.time() - t0:.1f} s in all")

