"""Orbax checkpoints of training runs, and loading of pretrained weights.

A run's directory holds ``checkpoints/<step>/{state,meta}``: the whole
:class:`~energy_jax.train.TrainState` after that many updates, and a JSON record
(:func:`run_meta`: the package version, the run format, the config, the model's architecture,
where in its epoch the run stopped, whether it finished), plus the files' SHA-256 in
``checkpoints.sha256/`` (:class:`RunCheckpoints`). Pretrained weights come from such a directory
(its newest intact checkpoint) or from a PyTorch ``.pt`` ``state_dict`` converted by the model's
registered converter (the reference's WRN checkpoints for ``"wrn"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from energy_jax import __version__, fetch, models, storage

# The training recipe's numbers and the checkpoints' layout: a change to either bumps it, and a
# run saved under another format is not resumed (its remaining epochs would follow other rules).
# 4: checkpoints at global steps (mid-epoch after a preemption), each with an integrity record.
RUN_FORMAT = 4


def run_meta(config, epoch: int, finished: bool, row: Dict[str, Any], *,
             steps_done: Optional[int] = None, steps_per_epoch: Optional[int] = None,
             history: Optional[List[Dict[str, Any]]] = None,
             partial: Optional[Dict[str, List[float]]] = None) -> Dict[str, Any]:
  """The JSON record saved beside each state: ``epoch`` (0-based) is complete when
  ``steps_done == steps_per_epoch``; ``history`` holds the rows of the epochs completed, from
  which a resumed run rebuilds its CSV, JSONL and TensorBoard rows; a preempted epoch records
  the per-step metrics of its ``steps_done`` steps in ``partial``, so that the resumed epoch's
  row is the uninterrupted one."""
  return {"epoch": epoch, "finished": finished, "version": __version__, "format": RUN_FORMAT,
          "architecture": models.architecture(config), "objective": config.objective.name,
          "config": config.to_dict(), "results": row, "steps_done": steps_done,
          "steps_per_epoch": steps_per_epoch, "history": history, "partial": partial}


def architecture_of(meta: Mapping[str, Any]) -> Dict[str, Any]:
  """The architecture a checkpoint's meta records (energy-jax 0.1 runs: a WRN on 32x32)."""
  found = dict(meta.get("architecture", {}))
  if "name" not in found:
    found.update(name="wrn", image_size=32)
  return found


def check_finite(tree, what: str, outcome: str = "it is not saved") -> None:
  """Raises, counting them and naming the first tensor, if ``tree`` (numpy or jax arrays) holds
  NaN or inf; the message ends with ``outcome``."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = np.asarray(leaf)
    if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):     # bfloat16 included
      count = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
      if count:
        bad.append((jax.tree_util.keystr(path, simple=True, separator="/"), count))
  if bad:
    raise FloatingPointError(f"{what} holds {sum(n for _, n in bad)} non-finite value(s) in "
                             f"{len(bad)} tensor(s), the first {bad[0][0]}; {outcome}")


def _sha256(path: epath.PathLike) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def integrity_record(root: epath.PathLike) -> Dict[str, str]:
  """``{relative path: SHA-256}`` of every file below ``root``: what :class:`RunCheckpoints`
  records for each checkpoint (and :mod:`energy_jax.export` for each artifact)."""
  return {name: _sha256(path) for name, path in storage.files_below(root).items()}


def record_differences(record: Mapping[str, str],
                       root: epath.PathLike) -> Tuple[List[str], List[str]]:
  """``(missing, changed)``: the files of ``record`` (:func:`integrity_record`) not below
  ``root``, and those whose content differs from it; files added since are not checked."""
  have = storage.files_below(root)
  missing = sorted(set(record) - set(have))
  changed = sorted(name for name, digest in record.items()
                   if name in have and _sha256(have[name]) != digest)
  return missing, changed


class RunCheckpoints:
  """Checkpoints of one run at global steps (the end of an epoch, or where a preemption stopped
  one), the last ``max_to_keep`` kept.

  Saves are synchronous and verified: a state holding NaN or inf is never saved
  (:func:`check_finite`), and after each save the SHA-256 of every file it wrote goes to
  ``<workdir>/checkpoints.sha256/<step>.json``. :meth:`latest_intact_step` checks them from the
  newest checkpoint down and moves a damaged one (changed, truncated or missing files, no
  record) to ``<workdir>/checkpoints.damaged/``, naming it, so the run continues from the newest
  intact one; since only verified, finite states are saved, rotation never removes the last
  intact checkpoint in favour of a bad one.
  """

  def __init__(self, workdir, max_to_keep: int = 2, log: Callable[[str], None] = print,
               read_only: bool = False):
    self.workdir = storage.location(workdir)
    self.directory = self.workdir / "checkpoints"
    self.records = self.workdir / "checkpoints.sha256"
    self.quarantine = self.workdir / "checkpoints.damaged"
    self.max_to_keep = max_to_keep
    self.log = log
    self.read_only = read_only      # an input (pretrained weights): never written to
    self.manager = self._open()

  def _open(self):
    if not self.read_only:
      # Rotation is done by save() after the new checkpoint's record is written (Orbax would
      # delete the older ones before it); cleanup removes what a save cut short left behind.
      return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=None, create=True, enable_async_checkpointing=False,
          cleanup_tmp_directories=True))
    # No rotation or save cadence (Orbax warns about either), and Orbax's warning that the
    # folder is read-only silenced: it was asked for.
    from absl import logging
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
      return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, max_to_keep=None, save_interval_steps=0))
    finally:
      logging.set_verbosity(level)

  def __enter__(self) -> "RunCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def steps(self) -> List[int]:
    """The saved steps, newest first (unverified)."""
    return sorted(self.manager.all_steps(), reverse=True)

  def verify(self, step: int) -> Optional[str]:
    """None if checkpoint ``step`` is as it was saved, else what is wrong with it. A checkpoint
    without an integrity record (a kill between Orbax's commit and the record, a run copied
    without ``checkpoints.sha256/``, energy-jax 0.1) is verified another way: Orbax committed it,
    its meta reads and its arrays read back finite (:meth:`verify_unrecorded`)."""
    record = self.records / f"{step}.json"
    if not record.exists():
      return self.verify_unrecorded(step)
    try:
      want = json.loads(storage.read_text(record))
    except (OSError, ValueError) as e:
      return f"unreadable integrity record {record}: {e}"
    missing, changed = record_differences(want, self.directory / str(step))
    if missing:
      return f"missing file(s) {missing[:3]}"
    if changed:
      return f"file(s) changed since the save: {changed[:3]}"
    return None

  def verify_unrecorded(self, step: int) -> Optional[str]:
    """None if checkpoint ``step``, which has no integrity record, was committed by Orbax and
    reads back whole and finite; else what is wrong with it. Without a record a changed byte
    that leaves the arrays finite cannot be seen: the record is written for it now (unless
    read-only), so that later reads compare against today's bytes."""
    where = self.directory / str(step)
    if not ocp.step.is_path_finalized(where):
      return "no integrity record, and Orbax did not commit it (a save cut short)"
    try:
      check_finite(self.restore_variables(step), f"checkpoint {where}")
      self.read_meta(step)
    except FloatingPointError as e:
      return f"no integrity record, and {str(e).split('; it is')[0]}"
    except Exception as e:      # Orbax / TensorStore raise several types for unreadable files
      return (f"no integrity record, and it does not read back: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    if not self.read_only:
      self._record(step)
      self.log(f"checkpoint {where} had no integrity record: Orbax committed it and it reads "
               f"back finite, so it is used; its record is written now")
    return None

  def newest_meta(self) -> Optional[Dict[str, Any]]:
    """The newest checkpoint's meta (None: no checkpoint, or no readable meta); read before
    verifying, so that a run of another format is refused, not moved aside."""
    steps = self.steps()
    if not steps:
      return None
    try:
      return self.read_meta(steps[0])
    except Exception:        # an unreadable meta: left to the verification
      return None

  def verify_on_main(self, step: int) -> Optional[str]:
    """:meth:`verify` of ``step`` (``"it is missing"`` if it was never saved) as process 0 finds
    it; the others take its answer (their disks may not hold the records)."""
    from energy_jax import distributed
    problem = None
    if distributed.is_main_process():
      problem = self.verify(step) if step in self.steps() else "it is missing"
    damaged = int(distributed.from_main_process(np.array([problem is not None], np.int64))[0])
    return (problem or "process 0 found it damaged (its log says why)") if damaged else None

  def latest_intact_step(self, move_damaged: bool = True) -> Optional[int]:
    """The newest intact step (None if there is none). Damaged checkpoints are named through
    ``log`` and, with ``move_damaged``, moved out of the way. Process 0 verifies and moves, and
    the others take its answer (their disks may not hold the records)."""
    from energy_jax import distributed
    found, moved = -1, 0
    if distributed.is_main_process():
      for step in self.steps():
        problem = self.verify(step)
        if problem is None:
          found = step
          break
        where = self.directory / str(step)
        if move_damaged:
          target = self.quarantine / f"{step}-{int(time.time())}"
          storage.move_tree(where, target)
          moved = 1
          self.log(f"checkpoint {where} is damaged ({problem}): moved to {target}")
        else:
          self.log(f"checkpoint {where} is damaged ({problem}): skipped")
    found, moved = distributed.from_main_process(np.array([found, moved], np.int64)).tolist()
    if moved:
      self.manager.close()
      self.manager = self._open()
    return None if found < 0 else int(found)

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    """Saves ``state`` (after checking it is finite) and the JSON ``meta`` as ``step``, then
    records the SHA-256 of the files written."""
    from energy_jax import distributed
    check_finite(state, f"the training state at step {step}")
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except (OSError, ValueError) as e:   # a full disk, a quota, a file-size limit (TensorStore
      # reports those as ValueError with the OS error in its message)
      reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()[0]
      raise OSError(getattr(e, "errno", None), f"could not write checkpoint {step} to "
                    f"{self.directory}: {reason[-300:]}; the checkpoints before it are kept, and "
                    "the same command continues from the newest once there is room") from e
    failed = ""
    if distributed.is_main_process():
      try:
        self._record(step)
      except OSError as e:
        failed = f"could not write the integrity record of checkpoint {step}: {e}"
    if distributed.any_process(bool(failed)):
      raise OSError(failed or f"process 0 could not write the integrity record of checkpoint "
                    f"{step}; the checkpoints before it are kept")
    for old in self.steps()[self.max_to_keep:]:           # oldest beyond max_to_keep
      self.delete(old)

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` and its integrity record (every process calls it)."""
    from energy_jax import distributed
    self.manager.delete(step)
    if distributed.is_main_process():
      (self.records / f"{step}.json").unlink(missing_ok=True)

  def _record(self, step: int) -> None:
    """Writes the SHA-256 of checkpoint ``step``'s files, atomically."""
    record = integrity_record(self.directory / str(step))
    storage.write_text(self.records / f"{step}.json", json.dumps(record, indent=0, sort_keys=True))

  def restore(self, target_state, step: int, sharding=None) -> Tuple[Any, Dict[str, Any]]:
    """``(state, meta)`` of ``step``, shaped like ``target_state`` and placed with ``sharding``
    (e.g. replicated over a global mesh) when given."""
    abstract = jax.tree_util.tree_map(
        lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if sharding
                   else ocp.utils.to_shape_dtype_struct(x)), target_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_variables(self, step: int) -> Dict[str, Any]:
    """``{'params', 'batch_stats'}`` of ``step``, as saved."""
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"]}

  def read_meta(self, step: int) -> Dict[str, Any]:
    """The JSON record of ``step`` without reading the arrays."""
    return self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    """Waits for pending saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def read_torch_state_dict(path: str) -> Mapping[str, Any]:
  """A ``.pt`` ``state_dict``, read with ``torch.load(weights_only=True)``: no pickled code runs.
  A ``module.`` prefix (``nn.DataParallel``) is left for the converter."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading .pt checkpoints needs torch: pip install 'energy_jax[torch]'") from e
  try:
    with epath.Path(path).open("rb") as f:
      state_dict = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for truncated / foreign files
    if "weights_only" in str(e):    # torch's advice (weights_only=False) would run its code
      raise ValueError(
          f"PyTorch checkpoint {path} holds pickled objects other than tensors (e.g. a whole "
          "model saved with torch.save(model)), which are not read since unpickling runs their "
          "code: save the model's state_dict() instead") from None
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {first}") from e
  if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
  return state_dict


def load_torch_checkpoint(path: str, config) -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``config``'s model from a PyTorch ``.pt`` file, through
  the model's registered converter."""
  entry = models.get(config.model.name)
  if entry.from_torch is None:
    raise ValueError(f"model {config.model.name!r} has no PyTorch converter registered; "
                     f"{path} cannot be read")
  return entry.from_torch(read_torch_state_dict(path), models.from_config(config))


def load_variables(path: str, config, what: str = "checkpoint") -> Dict[str, Any]:
  """``{'params', 'batch_stats'}`` from a run directory (latest epoch), its ``checkpoints/``
  folder, a PyTorch ``.pt`` state_dict (on a disk or at a ``gs://`` URL) or a name of
  :mod:`energy_jax.fetch` (``energy_ood:cifar10_energy_ft``), checked against
  ``config``'s model. ``what`` names ``path`` in errors."""
  if not path:
    raise ValueError("no pretrained checkpoint given (config.pretrained is empty)")
  if fetch.is_name(path):             # the authors' weights by name, converted once to Orbax
    path = fetched_run(path, config)
  found = storage.check_reachable(path, what)
  if not found.exists():
    raise FileNotFoundError(f"{what} not found: {path}")
  if found.is_file():
    return load_torch_checkpoint(str(found), config)
  workdir = found.parent if found.name == "checkpoints" else found
  if not (workdir / "checkpoints").is_dir():                    # read, never created
    raise FileNotFoundError(f"{path} holds no Orbax checkpoint (no folder "
                            f"{workdir / 'checkpoints'})")
  with RunCheckpoints(workdir, read_only=True,               # an input: never written to
                      log=lambda message: print(message, file=sys.stderr)) as ckpts:
    step = ckpts.latest_intact_step(move_damaged=False)
    if step is None:
      raise FileNotFoundError(f"{path} holds no intact Orbax checkpoint (looked in "
                              f"{ckpts.directory})")
    meta = ckpts.read_meta(step)
    models.check_architecture(architecture_of(meta), config, f"{ckpts.directory}/{step}")
    if not meta.get("finished", True) and jax.process_index() == 0:
      print(f"note: {workdir} holds a run that has not finished (epoch {meta['epoch'] + 1} of "
            f"{meta['config']['epochs']}); its newest checkpoint, step {step}, is used",
            file=sys.stderr)
    return ckpts.restore_variables(step)


# ----------------------------------------------------------------------------------------------
# The authors' checkpoints by name (energy_jax.fetch), converted once.


def _process_count() -> int:
  return jax.process_count()


def _save_converted(entry: "fetch.Entry", config, variables, run: str, tmp: str) -> None:
  """Saves the converted ``variables`` as the Orbax run folder ``tmp`` (a collective save where
  there are several processes: each calls it with the same ``tmp``), renamed to ``run`` by
  process 0."""
  from energy_jax import distributed
  meta = {"epoch": 0, "finished": True, "version": __version__, "format": RUN_FORMAT,
          "architecture": models.architecture(config), "converted_from": fetch.url_of(entry),
          "checksum": list(entry.checksum)}
  with RunCheckpoints(tmp, log=fetch.log) as saved:
    saved.save(0, jax.device_get(variables), meta)
  if distributed.is_main_process():
    fetch.move_into_place(tmp, run)
    fetch.log(f"{entry.name}: converted {entry.filename} to {run}")


def fetched_run(name: str, config, cache: Optional[str] = None) -> str:
  """The Orbax run folder of the :mod:`energy_jax.fetch` checkpoint ``name`` for ``config``'s
  model, in the fetch cache: the ``.pt`` downloaded and converted once (with torch), read
  afterwards without it. With several
  processes (a shared cache, as the run folder is), every process must call it at the same
  point: process 0 alone looks at the cache and downloads, and the conversion's save is
  collective (Orbax writes on process 0 and waits for all)."""
  entry = fetch.get(name)
  if entry.kind != "checkpoint":
    names = (n for n, e in fetch.ENTRIES.items() if e.kind == "checkpoint")
    raise fetch.FetchError(f"{name} is a data set, not a checkpoint; checkpoints: "
                           f"{', '.join(names)}")
  run = os.path.join(fetch.cache_dir(cache), entry.folder, "orbax")
  done = os.path.join(run, "checkpoints")
  if _process_count() == 1:
    if not os.path.isdir(done):
      variables = load_torch_checkpoint(fetch.download(name, cache), config)
      tmp = f"{run}.{os.getpid()}.tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      _save_converted(entry, config, variables, run, tmp)
    return run
  # Several processes: each deciding for itself would convert into a folder of its own (a
  # collective save that then waits forever, or folders left empty), or skip the save the others
  # wait in. Process 0 decides for all: 0 convert, 1 already there, 2 the download failed.
  from energy_jax import distributed
  state, problem = 0, ""
  if distributed.is_main_process():
    if os.path.isdir(done):
      state = 1
    else:
      try:
        fetch.download(name, cache)
      except fetch.FetchError as e:
        state, problem = 2, str(e)
      # A folder an earlier run with this process id left (the others write nothing before
      # the broadcast below, which they wait in).
      shutil.rmtree(f"{run}.{os.getpid()}.tmp", ignore_errors=True)
  state, pid = (int(v) for v in distributed.from_main_process(
      np.array([state, os.getpid()], np.int64)))
  if state == 2:
    raise fetch.FetchError(problem or f"{name}: process 0 could not download it (its log says "
                           "why)")
  if state == 0:
    # Every process reads the .pt process 0 downloaded (the save needs the arrays on each); one
    # that cannot is named before the collective save, which would otherwise wait for it forever.
    pt = os.path.join(fetch.cache_dir(cache), "downloads", entry.filename)
    variables, failed = None, ""
    try:
      variables = load_torch_checkpoint(pt, config)
    except Exception as e:              # torch missing, a file unreadable from this process
      failed = f"{name}: cannot convert {pt}: {type(e).__name__}: {e}"
    if distributed.any_process(bool(failed)):
      raise fetch.FetchError(failed or f"{name}: another process cannot convert {pt} (its log "
                             "says why)")
    _save_converted(entry, config, variables, run, f"{run}.{pid}.tmp")  # process 0's folder
    distributed.any_process(False)      # the others wait for process 0's rename
  return run
