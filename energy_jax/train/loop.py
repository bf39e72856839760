"""The run: resume from the run's own checkpoint, else start from the pretrained model, else fresh;
then per epoch: train, evaluate the test set, save, write."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from energy_jax import (checkpoints, config as config_lib, distributed, inference, losses, models,
                        objectives, parallel, progress, storage)
from energy_jax.data import host_stream_available, load_run_data, sampling
from energy_jax.data.run_data import RunData
from energy_jax.config import resume
from energy_jax.train import margins
from energy_jax.train.preemption import PreemptionWatch
from energy_jax.train.programs import RunPrograms, compile_run
from energy_jax.train.run_lock import RunInProgress, WorkdirLock
from energy_jax.train.state import TrainState, create_train_state
from energy_jax.train.step import (device_data, device_epoch_fn, epoch_calls, fixed_length_calls,
                                   host_step_fn, pad_call, step_indices_spec)
from energy_jax.train.writer import CSV, JSONL, history_rows, open_run_writer

# The record a sweep keeps in its workdir and the folder of its members' runs
# (energy_jax.train.sweep_loop): a single run refuses the sweep's folder and its members'.
SWEEP_RECORD = "sweep.json"
SWEEP_MEMBERS = "members"


def check_not_in_sweep(workdir) -> None:
  """Refuses a sweep's folder or a member's (training it alone would leave the sweep's record
  behind it); evaluate.py and ``config.pretrained`` read a member as any run."""
  path = storage.location(workdir)
  if (path / SWEEP_RECORD).exists():
    raise FileExistsError(f"{workdir} holds a sweep ({SWEEP_RECORD}): continue it with the same "
                          "--sweep flags, or give a single run a --workdir of its own")
  sweep = path.parent.parent
  if path.parent.name == SWEEP_MEMBERS and (sweep / SWEEP_RECORD).exists():
    raise FileExistsError(f"{workdir} is a member of the sweep in {sweep}: continue the sweep "
                          "with its --sweep flags, or give a single run a --workdir of its own "
                          "(evaluate.py and --config.pretrained read a member as a run)")


class Start(NamedTuple):
  """Where a run starts: ``epoch`` (0-based) at ``step`` of it, with the per-step metrics of
  the steps before ``step`` when a preempted epoch resumes, the config saved with the
  checkpoint it resumes from (None on a new run), and the rows of the epochs before (None: a
  checkpoint saved without them, whose rows are those of the files)."""
  epoch: int
  step: int = 0
  partial: Optional[Dict[str, List[float]]] = None
  saved_config: Optional[Dict[str, Any]] = None
  history: Optional[List[Dict[str, Any]]] = ()


def train_and_evaluate(config, workdir: str, log: Callable[[str], None] = print,
                       data_cache: Optional[Dict] = None) -> Dict[str, Any]:
  """Trains per ``config`` in ``workdir``; returns the last epoch's row (``{"preempted": True,
  ...}`` when SIGTERM stopped it; the same call then continues where it stopped).

  Each epoch writes a row (:class:`~energy_jax.train.writer.RunWriter`); the test set is
  evaluated every ``config.eval_every_epochs`` epochs and after the last, a verified checkpoint
  is saved every ``config.checkpoint_every_epochs`` and after the last. The same command
  continues a killed run from its newest intact checkpoint with identical results. Margins
  given as "auto" are computed from the starting model before the first step (a resumed run
  takes those it computed then), and the run's config with the numbers is the one saved
  (:mod:`energy_jax.train.margins`). ``data_cache``: see :func:`energy_jax.data.load_run_data`.
  """
  objective, mesh = check_config(config)
  log = distributed.main_process_only(log)
  workdir = storage.check_reachable(workdir)
  check_not_in_sweep(workdir)
  if config.pretrained:
    storage.check_reachable(config.pretrained, "config.pretrained")
  log(f"config of {workdir}:\n{config}")
  t0 = time.time()
  data = load_run_data(config, objective.uses_outliers, data_cache)
  steps = sampling.steps_per_epoch(len(data.train), config.batch_size, config.drop_remainder,
                                   data.train.source)
  times = {"data": time.time() - t0}
  row: Dict[str, Any] = {}
  with removed_if_start_fails(workdir), WorkdirLock(workdir, log), PreemptionWatch() as watch, \
      checkpoints.RunCheckpoints(workdir, config.keep_checkpoints, log) as ckpts:
    state, start = initial_state(config, workdir, ckpts, steps, log, mesh)
    config = margins.resolve(
        config, state.variables, data.train.images,
        data.outliers.images if data.outliers is not None else None, mesh, start.saved_config,
        log)
    # The programs of the run compiled here, once: the epoch's with the config the run trains
    # with (margins resolved); the state's creation, compiled above, is reused; the evaluation's
    # is the same program when test_metrics compiles it.
    programs = compile_run(config, len(data.train), len(data.test),
                           len(data.outliers) if data.outliers is not None else 0, mesh,
                           evaluation=False)
    run_epoch = epoch_runner(config, data, mesh, steps, watch, programs)
    times["setup"] = time.time() - t0 - times["data"]
    log(run_summary(config, data, steps, mesh, times))
    history = None if start.history is None else list(start.history)
    with open_run_writer(config, workdir, start.epoch, log, history) as writer:
      for epoch in range(start.epoch, config.epochs):
        t_epoch = time.time()
        first = start.step if epoch == start.epoch else 0
        state, metrics, done = run_epoch(state, epoch, first)
        metrics = with_steps_before(start.partial if epoch == start.epoch else None, metrics)
        check_losses_finite(metrics["loss"], epoch, ckpts)
        if done < steps:              # preempted: save where it stopped, write nothing else
          save_checkpoint(ckpts, config, state, epoch, done, steps, history, partial=metrics)
          return stopped_by_signal(epoch, done, steps, watch.signal_name, log)
        row = completed_epoch_row(config, state, epoch, metrics, steps, time.time() - t_epoch,
                                  t_epoch, data.test, mesh)
        times.setdefault("first_epoch", row["train_s"])
        # The row first, then the checkpoint, which holds every row so far: a kill between the
        # two resumes from the checkpoint before, which drops the row and writes it again; a
        # kill after the checkpoint resumes with the row, whatever the files hold.
        writer.write(row)
        if history is not None:
          history.append(row)
        stopped = save_after_epoch(config, epoch, steps, watch, lambda finished: save_checkpoint(
            ckpts, config, state, epoch, steps, steps, history, row, finished), log)
        if stopped:
          return stopped
  log(timing_summary(times, t0))
  return row


@contextlib.contextmanager
def removed_if_start_fails(workdir: str, holds_work: Optional[Callable[[Any], bool]] = None):
  """Removes ``workdir`` if this run made it and ends in an error (a damaged pretrained model, a
  wrong architecture, Ctrl-C while compiling) before it saved a checkpoint or wrote a row: a
  failed start leaves no folder behind it did not find. ``holds_work(path)`` says what counts
  as work kept (default: a run's rows or checkpoints; a sweep's: its members' folders)."""
  path = storage.location(workdir)
  made = distributed.is_main_process() and not path.exists()
  try:
    yield
  except RunInProgress:         # another run made the folder in the meantime and holds it
    raise
  except BaseException:
    if made and path.exists() and not (holds_work or run_holds_work)(path):
      path.rmtree()
    raise


def run_holds_work(path) -> bool:
  """Whether a run's folder holds rows of its history or a checkpoint."""
  return bool(history_rows(path)) or holds_files(path / "checkpoints")


def holds_files(folder) -> bool:
  """Whether ``folder`` exists and holds a file or folder."""
  return folder.exists() and any(folder.iterdir())


def save_checkpoint(ckpts: checkpoints.RunCheckpoints, config, state: TrainState, epoch: int,
                    done: int, steps: int, history: Optional[List[Dict[str, Any]]],
                    row: Optional[Dict[str, Any]] = None, finished: bool = False,
                    partial: Optional[Dict[str, np.ndarray]] = None) -> None:
  """Saves ``state`` after ``done`` of the ``steps`` steps of ``epoch`` (0-based), as global step
  ``epoch * steps + done``, with the rows of the epochs completed (``history``); a preempted
  epoch keeps its per-step metrics so far in ``partial``."""
  ckpts.save(epoch * steps + done, jax.device_get(state), checkpoints.run_meta(
      config, epoch, finished, row or {}, steps_done=done, steps_per_epoch=steps,
      history=history,
      partial=None if partial is None else {k: np.asarray(v).tolist()
                                            for k, v in partial.items()}))


def stopped_by_signal(epoch: int, done: int, steps: int, signal_name: str,
            log: Callable[[str], None]) -> Dict[str, Any]:
  """Says where SIGTERM or SIGINT stopped the run (saved there); the run's return value."""
  where = (f"at epoch {epoch + 1}, step {done} of {steps}" if done < steps
           else f"after epoch {epoch + 1}")
  log(f"stopped by {signal_name} {where}: saved; the same command continues from there")
  return {"preempted": True, "signal": signal_name, "epoch": epoch + 1, "steps_done": done}


def run_summary(config, data: RunData, steps: int, mesh, times: Dict[str, float]) -> str:
  devices, groups = mesh.devices.size, mesh.shape.get(parallel.MEMBERS, 1)
  return (f"{config.objective.name} training: {len(data.train)} train / {len(data.test)} test "
          f"images"
          f"{f', {len(data.outliers)} outliers' if data.outliers is not None else ''}; {steps} "
          f"steps/epoch, {devices} device(s)"
          f"{f' in {groups} member groups' if groups > 1 else ''} x "
          f"{config.batch_size // mesh.shape[parallel.AXIS]}, input "
          f"{config.input_pipeline}; data loaded in {times['data']:.1f} s")


def epoch_row(config, epoch: int, metrics: Dict[str, np.ndarray], learning_rate: float,
              seconds: float) -> Dict[str, Any]:
  """An epoch's row: the reference's running average of the loss, each metric's epoch mean, the
  rate of the epoch's last update."""
  return {"epoch": epoch + 1, "train_loss": reference_average(metrics["loss"]),
          **{f"mean_{k}": float(np.mean(v)) for k, v in metrics.items()},
          "learning_rate": learning_rate, "train_s": seconds}


def completed_epoch_row(config, state: TrainState, epoch: int, metrics: Dict[str, np.ndarray],
                        steps: int, train_s: float, t_epoch: float, test, mesh) -> Dict[str, Any]:
  """The row of a completed epoch (:func:`epoch_row`), with the test set's loss and error where
  the run ends or ``config.eval_every_epochs`` says so, and the epoch's times."""
  row = epoch_row(config, epoch, metrics, float(state.learning_rate((epoch + 1) * steps - 1)),
                  train_s)
  if epoch + 1 == config.epochs or (epoch + 1) % config.eval_every_epochs == 0:
    row.update(test_metrics(config, state, test, mesh))
  row.update(time_s=time.time() - t_epoch, eval_s=time.time() - t_epoch - train_s)
  return row


def save_after_epoch(config, epoch: int, steps: int, watch: PreemptionWatch,
                     save: Callable[[bool], None], log: Callable[[str], None]):
  """After a completed epoch's rows are written: ``save(finished)`` where the run ends or
  ``config.checkpoint_every_epochs`` says so, and where a stop was asked for during the epoch's
  last call or its evaluation, which then ends the run (:func:`stopped_by_signal`'s value is
  returned; None where the run goes on)."""
  finished = epoch + 1 == config.epochs
  saved = finished or (epoch + 1) % config.checkpoint_every_epochs == 0
  if saved:
    save(finished)
  if not finished and watch.requested():
    if not saved:
      save(False)
    return stopped_by_signal(epoch, steps, steps, watch.signal_name, log)
  return None


def with_steps_before(before: Optional[Dict[str, List[float]]], metrics: Dict[str, np.ndarray]):
  """The per-step metrics of a resumed epoch: those saved at the preemption, then the new ones."""
  if not before:
    return metrics
  return {k: np.concatenate([np.asarray(before[k], np.asarray(v).dtype), v])
          for k, v in metrics.items()}


def check_config(config, sweep: bool = False):
  """``(objective, mesh)`` of ``config``, after checking what must hold before any work (a
  ``sweep``'s member groups and batches: :func:`energy_jax.train.sweep.sweep_mesh`)."""
  config_lib.validate(config)
  if not sweep and config.member_groups != 1:
    raise ValueError(f"config.member_groups = {config.member_groups} splits the members of a "
                     "sweep (--sweep) over groups of devices; a single run has one member: set "
                     "it to 1")
  objective = objectives.get(config.objective.name)
  mesh = parallel.make_mesh(config.num_devices or None)
  if not sweep:           # a sweep's batches split over a member group's devices
    check_batches(config, mesh)
  return objective, mesh


def check_batches(config, mesh) -> None:
  """Raises unless the ID and (where the objective reads them) outlier batches split evenly over
  the batch axis of ``mesh``."""
  parallel.check_divisible(config.batch_size, mesh)
  if objectives.get(config.objective.name).uses_outliers:
    parallel.check_divisible(config.outlier_batch_size, mesh, "outlier batch size")


def initial_state(config, workdir: str, ckpts: checkpoints.RunCheckpoints, steps: int,
                  log: Callable[[str], None], mesh) -> Tuple[TrainState, Start]:
  """``(state on the mesh, start)``: the run's newest intact checkpoint (refused if its config
  differs in a field that changes the run, see :mod:`energy_jax.config.resume`), else the
  pretrained model, else a fresh model (pretraining only)."""
  rng = jax.random.PRNGKey(config.seed)
  total_steps = steps * config.epochs
  check_run_format(ckpts, workdir)           # before verifying: another format is refused
  saved = ckpts.steps()
  latest = ckpts.latest_intact_step()
  if latest is not None:
    meta = ckpts.read_meta(latest)
    source = f"{ckpts.directory}/{latest}"
    check_resumable_checkpoint(meta, config, workdir, source, steps)
    if meta.get("finished") and meta["epoch"] + 1 >= config.epochs:   # else: epochs overridden
      raise FileExistsError(
          f"{workdir} holds a finished run (epoch {meta['epoch'] + 1} of {config.epochs}); "
          f"choose another --workdir, or delete {workdir} to start over")
    state, _ = ckpts.restore(create_train_state(config, rng, total_steps), latest,
                             parallel.replicated(mesh))
    epoch, done = meta["epoch"], meta["steps_done"]
    log(f"resuming {workdir} at epoch {epoch + 1}, step {done} of {steps}")
    history = meta.get("history")
    if done == meta["steps_per_epoch"]:
      return state, Start(epoch + 1, saved_config=meta["config"], history=history)
    return state, Start(epoch, done, meta["partial"], meta["config"], history)
  # Rows of epochs after the newest checkpoint are run again; with every checkpoint damaged, a
  # new start would overwrite rows that no checkpoint can bring back.
  rows = history_rows(workdir) if saved else 0
  if rows:
    raise FileExistsError(
        f"{workdir} holds the history of a run ({rows} epoch row(s) in {CSV}) but no intact "
        f"checkpoint to continue it from (the damaged ones are in {ckpts.quarantine}); starting "
        f"over would overwrite it: choose another --workdir, or move {CSV} and {JSONL} out of "
        "it")
  state = create_train_state(config, rng, total_steps, pretrained_variables(config, log))
  return parallel.put_replicated(state, mesh), Start(0)


def check_run_format(ckpts: checkpoints.RunCheckpoints, workdir: str) -> None:
  """Refuses a workdir whose newest checkpoint was saved under another run format (read before
  verifying, so that such a run is refused rather than moved aside as damaged)."""
  newest = ckpts.newest_meta()
  saved_format = None if newest is None else newest.get("format", 1)
  if saved_format not in (None, checkpoints.RUN_FORMAT):
    raise ValueError(
        f"{workdir} holds a run saved by energy-jax {newest.get('version', '0.1')} (run format "
        f"{saved_format}), whose training numbers or checkpoints differ from this version's "
        f"(format {checkpoints.RUN_FORMAT}); finish it with that version, or start a new "
        "--workdir")


def check_resumable_checkpoint(meta: Dict[str, Any], config, workdir: str, source: str,
                               steps: int) -> None:
  """Refuses to continue the checkpoint at ``source`` (its ``meta``) under ``config``: another
  architecture, a config that changes the run (:mod:`energy_jax.config.resume`), or another
  number of ``steps`` per epoch."""
  models.check_architecture(checkpoints.architecture_of(meta), config, source)
  resume.check_resumable(meta["config"], config, workdir)
  if meta["steps_per_epoch"] != steps:
    raise ValueError(
        f"{source} was saved with {meta['steps_per_epoch']} steps per epoch, this config "
        f"gives {steps} (batch_size, train_subset, drop_remainder or the data changed); a "
        "resumed run keeps its epochs: restore them, or start a new --workdir")


def pretrained_variables(config, log: Callable[[str], None]) -> Optional[Dict[str, Any]]:
  """The weights a new run starts from: ``config.pretrained``'s, None for a fresh model
  (pretraining); refused for an objective that fine-tunes (it trains on outliers)."""
  if config.pretrained:
    variables = checkpoints.load_variables(config.pretrained, config, "config.pretrained")
    log(f"loaded pretrained weights from {config.pretrained}")
    return variables
  if objectives.get(config.objective.name).uses_outliers:
    raise ValueError("fine-tuning needs a pretrained model: set --config.pretrained to a run "
                     "directory of experiments/pretrain.py or a reference .pt file")
  return None


EpochRunner = Callable[[TrainState, int, int],
                       Tuple[TrainState, Dict[str, np.ndarray], int]]


def epoch_runner(config, data: RunData, mesh, steps: int, watch: PreemptionWatch,
                 programs: RunPrograms, epoch_fn: Optional[Callable[[bool], Any]] = None
                 ) -> EpochRunner:
  """``run(state, epoch, first_step) -> (state, {metric: per-step values}, steps done)``: one
  epoch on either input path from ``first_step``, the images of each step drawn by
  :func:`energy_jax.data.sampling.epoch_indices`; it stops early at a step boundary when
  ``watch`` asks (then steps done < ``steps``). Device input runs each call with the program
  of its length in ``programs.epochs``, or, where one program runs every call
  (:func:`~energy_jax.train.step.fixed_length_calls`), a shorter call padded to the longest.
  ``epoch_fn(padded)``: the compiled epoch its calls run instead of the run's
  ``device_epoch_fn`` (a sweep's, :mod:`energy_jax.train.sweep`)."""
  num_out = len(data.outliers) if data.outliers is not None else 0
  padded = sampling.has_partial_batch(len(data.train), config.batch_size, config.drop_remainder)

  def indices(epoch):
    return sampling.epoch_indices(config.seed, epoch, len(data.train), config.batch_size,
                                  num_out, config.outlier_batch_size,
                                  drop_remainder=config.drop_remainder,
                                  outlier_sampling=config.outlier_sampling)

  if config.input_pipeline == "device":
    fn = epoch_fn(padded) if epoch_fn else device_epoch_fn(config, mesh, padded)
    fixed = fixed_length_calls(config)
    length = max(c.stop - c.start for c in epoch_calls(steps, config.steps_per_call))
    pools = jax.block_until_ready(parallel.put_replicated(device_data(
        data.train.images, data.train.labels,
        data.outliers.images if data.outliers is not None else None), mesh))

    def calls(state, epoch, first):
      in_idx, out_idx = indices(epoch)
      for sl in epoch_calls(steps, config.steps_per_call):
        if sl.stop <= first:
          continue
        sl = slice(max(sl.start, first), sl.stop)
        idx = (in_idx[sl], out_idx[sl])
        if fixed:                      # one program, a shorter call padded with rows not run
          idx = pad_call(*idx, length)
        idx = parallel.put_global(idx, mesh, step_indices_spec())
        state, m = programs.epochs.get(idx[0].shape[0], fn)(state, pools, *idx)
        m = parallel.to_host(m)          # (a sweep's are split over member groups)
        yield state, jax.tree_util.tree_map(lambda v: v[:sl.stop - sl.start], m), sl.stop
  else:
    if not host_stream_available():
      raise ImportError("config.input_pipeline = 'tfdata' needs TensorFlow (pip install "
                        "'energy_jax[train]'), or use the device input pipeline")
    from energy_jax.data import host_stream
    step = host_step_fn(config, mesh)

    def calls(state, epoch, first):
      in_idx, out_idx = indices(epoch)
      for k, batch in enumerate(host_stream.epoch_stream(
          data.train, data.outliers, in_idx, out_idx, seed=config.seed, epoch=epoch,
          padded=padded, first_step=first), start=first + 1):
        state, m = step(state, parallel.put_sharded(batch, mesh))
        yield state, jax.tree_util.tree_map(lambda v: v[None], parallel.to_host(m)), k

  images_per_step = config.batch_size + (config.outlier_batch_size if num_out else 0)

  def run(state, epoch, first):
    parts, done, t0 = [], first, time.time()
    bar = progress.bar(steps - first, f"epoch {epoch + 1}/{config.epochs}", config.progress_bar,
                       "step")
    for state, m, done_now in calls(state, epoch, first):
      parts.append(m)
      bar.update(done_now - done)
      done = done_now
      bar.set_postfix(img_s=f"{bar.n * images_per_step / max(time.time() - t0, 1e-9):.0f}")
      if done < steps and watch.requested():
        break
    bar.close()
    return state, {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}, done
  return run


def check_losses_finite(step_losses: np.ndarray, epoch: int,
                        ckpts: checkpoints.RunCheckpoints):
  """Stops the run at a non-finite training loss, before anything of the epoch is saved."""
  if not np.all(np.isfinite(step_losses)):
    bad = int(np.flatnonzero(~np.isfinite(step_losses))[0])
    saved = ckpts.steps()
    raise FloatingPointError(
        f"training loss became {step_losses[bad]} at epoch {epoch + 1}, step {bad + 1}; "
        f"nothing after the last good checkpoint was saved: "
        f"{f'{ckpts.directory}/{saved[0]}' if saved else 'none yet'}")


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

