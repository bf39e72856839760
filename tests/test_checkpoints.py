"""Verified checkpoints, the workdir lock, the refusal of a changed config on resume, and a
preempted run that continues mid-epoch to the uninterrupted run's numbers."""

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from energy_jax import checkpoints, config as config_lib, train
from energy_jax.data import toy
from energy_jax.train import loop, preemption, run_lock


@pytest.fixture(scope="module")
def toy_id(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt_toy")
  path, _ = toy.make_toy_dataset(str(d), train_per_class=16, test_per_class=4, num_outliers=16)
  return path                      # 64 training images: 4 steps of 16 per epoch


def _config(toy_id, **kw):
  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = toy_id
  # Two steps a call (a stop can fall inside an epoch of 4): XLA:CPU runs a one-step program
  # several times slower per step (docs/performance.md, CPU).
  c.num_devices, c.epochs, c.steps_per_call = 1, 2, 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _assert_same_variables(run_a, run_b, config, scale_tol=0.0):
  """The two runs' final variables: equal bit for bit (both ran the same compiled programs on the
  same inputs in this process), or, for runs on other device counts (other programs), each tensor
  within ``scale_tol`` of its largest entry plus 1e-7."""
  a = checkpoints.load_variables(str(run_a), config)
  b = checkpoints.load_variables(str(run_b), config)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if scale_tol:
      assert np.max(np.abs(x - y)) <= scale_tol * np.max(np.abs(x)) + 1e-7
    else:
      np.testing.assert_array_equal(x, y)


def _files_in(folder):
  return sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)


def _state(seed=0):
  c = config_lib.get_config("test", "pretrain")
  return jax.device_get(train.create_train_state(c, jax.random.PRNGKey(seed), 10))


def test_a_damaged_latest_checkpoint_is_named_moved_aside_and_the_one_before_used(tmp_path):
  said = []
  c = config_lib.get_config("test", "pretrain")
  with checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=3, log=said.append) as ckpts:
    for step in (4, 8, 12):
      ckpts.save(step, _state(step), checkpoints.run_meta(c, step // 4 - 1, False, {}))
    assert ckpts.latest_intact_step() == 12 and not said
    # Bytes changed in place (size unchanged) in the newest, a file missing from the next.
    victim = max(_files_in(tmp_path / "checkpoints" / "12"), key=os.path.getsize)
    blob = bytearray(open(victim, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(blob))
    os.remove(_files_in(tmp_path / "checkpoints" / "8")[0])
    # One step asked for (a sweep continues every member from its commit): what process 0 finds.
    assert ckpts.verify_on_main(4) is None and ckpts.verify_on_main(5) == "it is missing"
    assert ckpts.verify_on_main(12).startswith("file(s) changed since the save")
    assert ckpts.latest_intact_step() == 4
  assert "checkpoints/12 is damaged (file(s) changed since the save" in said[0]
  assert "checkpoints/8 is damaged (missing file(s)" in said[1]
  assert sorted(os.listdir(tmp_path / "checkpoints.damaged"))[0].startswith("12-")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]



def test_a_members_checkpoints_past_the_sweeps_commit_are_deleted_with_their_records(tmp_path):
  # A kill between the members' saves: member 0 saved step 8, the sweep's commit is still 4.
  from energy_jax.train import sweep_loop
  said = []
  c = config_lib.get_config("test", "pretrain")
  with checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=3) as ckpts:
    state = _state()
    for step in (4, 8):
      ckpts.save(step, state, checkpoints.run_meta(c, step // 4 - 1, False, {}))
    sweep_loop.drop_after(ckpts, 4, said.append)
    assert ckpts.steps() == [4] and ckpts.verify(4) is None
    assert sorted(os.listdir(tmp_path / "checkpoints.sha256")) == ["4.json"]
    assert said == [f"checkpoint {tmp_path}/checkpoints/8 is past the sweep's last commit (a kill "
                    "between the members' saves): removed, the sweep computes it again"]
    sweep_loop.drop_after(ckpts, None, said.append)           # nothing committed yet
    assert ckpts.steps() == [] and not os.listdir(tmp_path / "checkpoints.sha256")


def test_a_checkpoint_without_its_record_is_read_back_and_used_or_moved_aside(tmp_path):
  # A kill between Orbax's commit and the record, or a run copied without checkpoints.sha256/:
  # a whole, finite checkpoint is used and recorded; a non-finite one is damage.
  said = []
  c = config_lib.get_config("test", "pretrain")
  with checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=3, log=said.append) as ckpts:
    ckpts.save(4, _state(4), checkpoints.run_meta(c, 0, False, {}))
    # Step 8 written by Orbax itself with NaN weights (RunCheckpoints.save refuses them).
    bad = _state(8)
    bad = bad.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, bad.params))
    ckpts.manager.save(8, args=checkpoints.ocp.args.Composite(
        state=checkpoints.ocp.args.StandardSave(bad),
        meta=checkpoints.ocp.args.JsonSave({})))
  shutil.rmtree(tmp_path / "checkpoints.sha256")
  with checkpoints.RunCheckpoints(str(tmp_path), log=said.append) as ckpts:
    assert ckpts.latest_intact_step() == 4
  assert "checkpoints/8 is damaged (no integrity record, and checkpoint" in said[0], said
  assert "non-finite value(s)" in said[0]
  assert "checkpoints/4 had no integrity record: Orbax committed it" in said[1], said
  assert os.path.exists(tmp_path / "checkpoints.sha256" / "4.json")
  # Recorded now: a byte changed later is seen as any other damage.
  assert checkpoints.RunCheckpoints(str(tmp_path)).verify(4) is None


def test_a_non_finite_state_is_never_saved(tmp_path):
  state = _state()
  state = state.replace(batch_stats=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                            state.batch_stats))
  with checkpoints.RunCheckpoints(str(tmp_path)) as ckpts:
    with pytest.raises(FloatingPointError, match=r"step 3 holds \d+ non-finite value\(s\) in "
                                                 r"\d+ tensor\(s\), the first batch_stats/"):
      ckpts.save(3, state, {})
    assert ckpts.steps() == []
  # bfloat16 (which numpy does not count as floating) is checked too.
  bf16 = {"w": np.array([1.0, np.inf], dtype=jax.numpy.bfloat16)}
  with pytest.raises(FloatingPointError, match=r"holds 1 non-finite value\(s\) in 1 tensor\(s\), "
                                               r"the first w"):
    checkpoints.check_finite(bf16, "x")


def test_rotation_keeps_the_newest_recorded_checkpoints(tmp_path):
  # keep_checkpoints = 1: the older checkpoint goes only after the new one's record is written.
  c = config_lib.get_config("test", "pretrain")
  with checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=1) as ckpts:
    for step in (4, 8, 12):
      ckpts.save(step, _state(), checkpoints.run_meta(c, step // 4 - 1, False, {}))
      assert ckpts.steps() == [step]
      assert os.listdir(tmp_path / "checkpoints.sha256") == [f"{step}.json"]


def test_a_second_live_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
  with run_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(run_lock.RunInProgress, match=rf"in use by a live run \(pid {os.getpid()} "):
      with run_lock.WorkdirLock(str(tmp_path)):
        pass
  with run_lock.WorkdirLock(str(tmp_path)):          # released: the next run takes it
    pass
  assert not os.path.exists(tmp_path / ".lock")       # no holder named once it ended
  # The lock is on the folder, held by the run's open descriptor: deleting .lock frees nothing.
  with run_lock.WorkdirLock(str(tmp_path)):
    os.remove(tmp_path / ".lock")
    with pytest.raises(run_lock.RunInProgress, match=r"in use by a live run \(another process\)"):
      with run_lock.WorkdirLock(str(tmp_path)):
        pass


def test_a_workdir_without_file_locks_is_refused_naming_the_lock(tmp_path, monkeypatch):
  import errno
  import fcntl

  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(fcntl, "flock", no_locks)
  with pytest.raises(run_lock.RunInProgress, match=rf"could not lock {tmp_path}/\.lock \(No locks "
                                                   r"available\): the workdir's file system offers"):
    with run_lock.WorkdirLock(str(tmp_path)):
      pass


def test_where_a_folder_cannot_be_locked_the_lock_file_is(tmp_path, monkeypatch):
  # NFS emulates flock with byte-range locks, which a directory cannot take (EBADF).
  import errno
  import fcntl
  import stat
  real = fcntl.flock

  def no_folder_locks(fd, op):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
      raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return real(fd, op)
  monkeypatch.setattr(fcntl, "flock", no_folder_locks)
  with run_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(run_lock.RunInProgress, match=rf"in use by a live run \(pid {os.getpid()} "):
      with run_lock.WorkdirLock(str(tmp_path)):
        pass
  assert open(tmp_path / ".lock").read() == ""        # kept (never deleted), its holder cleared
  with run_lock.WorkdirLock(str(tmp_path)):
    pass


def test_resume_refuses_a_changed_config_naming_each_field(toy_id, tmp_path):
  c = _config(toy_id, epochs=1)
  train.train_and_evaluate(c, str(tmp_path), log=lambda s: None)
  # The finished check comes after the config check: a changed run is named first.
  changed = _config(toy_id, epochs=1, seed=3)
  changed.optimizer.learning_rate = 0.2
  with pytest.raises(ValueError,
                     match=r"Changed: optimizer.learning_rate: 0\.1 -> 0\.2; seed: 1 -> 3"):
    train.train_and_evaluate(changed, str(tmp_path), log=lambda s: None)
  # Fields that do not change the run's numbers may change; then the run is simply finished.
  watched = _config(toy_id, epochs=1, progress_bar=True, eval_every_epochs=3, steps_per_call=2)
  with pytest.raises(FileExistsError, match="holds a finished run"):
    train.train_and_evaluate(watched, str(tmp_path), log=lambda s: None)
  # Listed in resume_override, a changed field is accepted: here the run is extended by an epoch.
  longer = _config(toy_id, epochs=2, resume_override="epochs")
  train.train_and_evaluate(longer, str(tmp_path), log=lambda s: None)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))[-1] == 2 * 4
  # Even when overridden, a resumed run keeps its epochs' length (its step count is positions).
  with pytest.raises(ValueError, match=r"was saved with 4 steps per epoch, this config gives 2"):
    train.train_and_evaluate(_config(toy_id, epochs=2, batch_size=32,
                                     resume_override="epochs,batch_size"),
                             str(tmp_path), log=lambda s: None)
  with pytest.raises(ValueError, match=r"resume_override = 'epoch' names unknown field\(s\) "
                                       r"epoch; did you mean config\.epochs\?"):
    config_lib.validate(_config(toy_id, resume_override="epoch"))


class _StopAfter:
  """A preemption watch that asks to stop after ``n`` boundaries."""

  signal_name = "SIGTERM"

  def __init__(self, n):
    self.n = n

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def requested(self):
    self.n -= 1
    return self.n < 0


def _run_stopped(config, workdir, monkeypatch, stops, log=lambda s: None):
  """Runs ``config`` in ``workdir`` with SIGTERM asked for at the ``stops + 1``-th boundary;
  returns the run's value."""
  monkeypatch.setattr(loop, "PreemptionWatch", lambda: _StopAfter(stops))
  try:
    return train.train_and_evaluate(config, str(workdir), log=log)
  finally:
    monkeypatch.setattr(loop, "PreemptionWatch", preemption.PreemptionWatch)


@pytest.mark.parametrize("pipeline", ["device", "tfdata"])
def test_a_preempted_run_continues_mid_epoch_to_the_uninterrupted_numbers(toy_id, tmp_path,
                                                                         monkeypatch, pipeline):
  if pipeline == "tfdata":
    pytest.importorskip("tensorflow")
  c = _config(toy_id, input_pipeline=pipeline)
  c.model.dropout_rate = 0.3
  full = train.train_and_evaluate(c, str(tmp_path / "full"), log=lambda s: None)
  # Asked after every call but an epoch's last and after each epoch, until epoch 2, step 2: on
  # the device, calls of 2 steps (after step 2 and epoch 1, then step 2 of epoch 2); tf.data
  # feeds one step a call (steps 1-3 and epoch 1, then steps 1 and 2 of epoch 2).
  said = []
  stops = 2 if pipeline == "device" else 5
  stopped = _run_stopped(c, tmp_path / "cut", monkeypatch, stops, said.append)
  assert stopped == {"preempted": True, "signal": "SIGTERM", "epoch": 2, "steps_done": 2}
  assert any("stopped by SIGTERM at epoch 2, step 2 of 4" in s for s in said)
  said.clear()
  resumed = train.train_and_evaluate(c, str(tmp_path / "cut"), log=said.append)
  assert any("resuming" in s and "at epoch 2, step 2 of 4" in s for s in said)
  # Bit for bit: both runs call the same compiled programs on the same inputs in this
  # process, and the checkpoint keeps the state and the losses so far exactly.
  assert resumed["train_loss"] == full["train_loss"]          # the epoch's whole average
  _assert_same_variables(tmp_path / "full", tmp_path / "cut", c)
  rows = [json.loads(l) for l in open(tmp_path / "cut" / "results.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2]


def test_a_run_resumed_on_another_device_count_continues_the_same_stream(toy_id, tmp_path,
                                                                          monkeypatch):
  # Dropout on; a small learning rate keeps the devices' float summation order from growing.
  c = _config(toy_id)
  c.optimizer.learning_rate = 0.01
  c.model.dropout_rate = 0.3
  full = train.train_and_evaluate(c, str(tmp_path / "full"), log=lambda s: None)
  assert _run_stopped(c, tmp_path / "cut", monkeypatch, 2)["preempted"]   # epoch 2, step 2 of 4
  c4 = _config(toy_id, num_devices=4)
  c4.optimizer.learning_rate = 0.01
  c4.model.dropout_rate = 0.3
  resumed = train.train_and_evaluate(c4, str(tmp_path / "cut"), log=lambda s: None)
  # Another crop, flip, dropout mask or batch would move the loss by percents. Two programs (1
  # and 4 devices) for the last two steps: measured loss equal, weights at most 6% of the bound
  # (SSE4_2, AVX, AVX2; 2026-12-06).
  assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
  _assert_same_variables(tmp_path / "full", tmp_path / "cut", c, scale_tol=1e-4)


def test_a_stop_asked_for_in_an_epochs_last_call_stops_after_that_epoch(toy_id, tmp_path,
                                                                       monkeypatch):
  c = _config(toy_id, steps_per_call=8, checkpoint_every_epochs=5)   # an epoch is one call
  full = train.train_and_evaluate(c, str(tmp_path / "full"), log=lambda s: None)
  said = []
  stopped = _run_stopped(c, tmp_path / "cut", monkeypatch, 0, said.append)
  assert stopped == {"preempted": True, "signal": "SIGTERM", "epoch": 1, "steps_done": 4}
  assert any("stopped by SIGTERM after epoch 1: saved" in s for s in said)
  resumed = train.train_and_evaluate(c, str(tmp_path / "cut"), log=lambda s: None)
  # Bit for bit: the same compiled epoch-long call on the same inputs in this process.
  assert resumed["train_loss"] == full["train_loss"]
  _assert_same_variables(tmp_path / "full", tmp_path / "cut", c)


class _Killed(BaseException):
  """kill -9 at a boundary of a save, raised there (see the test for what does not clean up)."""


# The calls that write a run's files at an epoch's end, in order: its CSV and JSONL (each a whole
# file, renamed into place), its TensorBoard scalars, the Orbax checkpoint (committed by a rename),
# its integrity record, and the deletion of the checkpoint rotation drops.
_WRITES = (("storage", "write_text"), ("ScalarWriter", "write"),
           ("CheckpointManager", "save"), ("CheckpointManager", "delete"))


def _count_or_kill_writes(monkeypatch, kill_at):
  """Wraps the calls of :data:`_WRITES`; returns the list of those made, and raises
  :class:`_Killed` before the ``kill_at``-th (0-based; None: never)."""
  from energy_jax import storage
  from energy_jax.train import writer
  made = []
  owners = {"storage": storage, "ScalarWriter": writer.ScalarWriter,
            "CheckpointManager": checkpoints.ocp.CheckpointManager}
  for owner, name in _WRITES:
    original = getattr(owners[owner], name)

    def wrapped(*args, _original=original, _name=f"{owner}.{name}", **kwargs):
      if kill_at is not None and len(made) == kill_at:
        raise _Killed(_name)
      made.append(_name)
      return _original(*args, **kwargs)
    monkeypatch.setattr(owners[owner], name, wrapped)
  return made


def _rows(workdir):
  """The CSV rows without their time column, the JSONL rows without their times, and the
  TensorBoard train losses by epoch."""
  from energy_jax.train import writer
  csv = [l.split(",") for l in open(workdir / "training_results.csv").read().splitlines()[1:]]
  jsonl = [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")}
           for l in open(workdir / "results.jsonl")]
  return ([r[:1] + r[2:] for r in csv], jsonl,
          writer.read_scalars(str(workdir / "tensorboard")).get("train/loss"))


def test_a_kill_at_every_boundary_of_a_save_loses_no_row(toy_id, tmp_path, monkeypatch):
  pytest.importorskip("tensorflow")          # the TensorBoard rows are rebuilt too
  c = _config(toy_id, keep_checkpoints=1, tensorboard=True)
  made = _count_or_kill_writes(monkeypatch, None)
  full = train.train_and_evaluate(c, str(tmp_path / "full"), log=lambda s: None)
  monkeypatch.undo()
  want = _rows(tmp_path / "full")
  assert [r[0] for r in want[0]] == ["001", "002"] and sorted(want[2]) == [1, 2]
  # Every boundary from epoch 1's row on: before, between and after each write.
  first = made.index("ScalarWriter.write") - 2      # epoch 1's CSV and JSONL rows
  boundaries = range(first, len(made) + 1)
  assert [m.split(".")[-1] for m in made[first:]] == (
      ["write_text", "write_text", "write", "save", "write_text"] * 2 + ["delete"])
  for k in boundaries:
    workdir = tmp_path / f"kill{k}"
    _count_or_kill_writes(monkeypatch, k)
    # A kill runs no cleanup of the run's: the folder of a run killed early stays.
    monkeypatch.setattr(loop, "removed_if_start_fails", lambda w: contextlib.nullcontext())
    with pytest.raises(_Killed) if k < len(made) else contextlib.nullcontext():
      train.train_and_evaluate(c, str(workdir), log=lambda s: None)
    monkeypatch.undo()
    if k >= len(made) - 2:       # killed once Orbax committed the last checkpoint: finished
      with pytest.raises(FileExistsError, match="holds a finished run"):
        train.train_and_evaluate(c, str(workdir), log=lambda s: None)
      resumed = full
    else:
      resumed = train.train_and_evaluate(c, str(workdir), log=lambda s: None)
    # Same compiled programs on the same inputs in this process: bit for bit.
    assert resumed["train_loss"] == full["train_loss"], k
    assert _rows(workdir) == want, (k, made[k] if k < len(made) else "end")
    _assert_same_variables(tmp_path / "full", workdir, c)


def test_ctrl_c_asks_once_then_interrupts_and_an_ignored_sigint_stays_ignored():
  import signal
  # What a process at a terminal has (a pytest-xdist worker ignores SIGINT).
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _ctrl_c_twice()
  finally:
    signal.signal(signal.SIGINT, before)
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)     # a background job `cmd &`
  try:
    with preemption.PreemptionWatch():
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)


def _ctrl_c_twice():
  import signal
  import time
  with preemption.PreemptionWatch() as watch:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)                        # Python runs the handler at the next bytecode
    assert watch.requested() and watch.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)


def test_a_failed_start_removes_only_a_folder_it_made_and_holds(tmp_path):
  made = tmp_path / "made"
  with pytest.raises(ValueError):
    with loop.removed_if_start_fails(str(made)):
      made.mkdir()
      raise ValueError("a damaged pretrained model")
  assert not made.exists()
  # Refused by another run that made the same new folder a moment before: it is that run's.
  theirs = tmp_path / "theirs"
  with pytest.raises(run_lock.RunInProgress):
    with loop.removed_if_start_fails(str(theirs)):
      theirs.mkdir()
      raise run_lock.RunInProgress("in use by a live run")
  assert theirs.exists()
  # A sweep's folder counts its members' folders as work kept (sweep_loop): one made is kept.
  sweep = tmp_path / "sweep"
  for member_made in (False, True):
    with pytest.raises(KeyboardInterrupt):
      with loop.removed_if_start_fails(str(sweep), lambda p: loop.holds_files(p / "members")):
        (sweep / "members").mkdir(parents=True)
        if member_made:
          (sweep / "members" / "0_seed=1").mkdir()
        raise KeyboardInterrupt      # Ctrl-C while compiling
    assert sweep.exists() == member_made
