"""Fault injection: one run is hit by a kill inside a save, a NaN state, a full disk, a kill -9 at
a random moment (drawn from FAULT_SEED, so a failure can be replayed), damaged checkpoint files,
a concurrent run and SIGTERM; each ends with a clear message, and the run, continued with the
same command, ends bit for bit where an uninterrupted run ends."""

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import REPO
from test_train import child_xla_flags, saved_steps

pytestmark = pytest.mark.heavy
WORKER = os.path.join(REPO, "tests", "fault_worker.py")
FAULT_SEED = int(os.environ.get("FAULT_SEED", "20261126"))
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  from energy_jax.data import toy as toy_data
  d = tmp_path_factory.mktemp("fault_data")
  toy_data.make_toy_dataset(str(d), train_per_class=16, test_per_class=4, num_outliers=16)
  return d                               # 64 training images: 4 steps of 16 per epoch


def _start(workdir, data, *extra, fsize=None):
  def limit():
    if fsize is not None:                # a full disk: writes past fsize bytes fail with EFBIG
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=child_xla_flags(), PYTHONPATH=REPO)
  # The output goes to a file: a pipe nobody reads while the run goes on would block the run
  # once it is full (a failed save's messages can fill it).
  log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
  p = subprocess.Popen([sys.executable, WORKER, "--workdir", str(workdir), "--data", str(data),
                        *extra], env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                       preexec_fn=limit)
  log.close()
  p.log = log.name
  return p


def _output(p) -> str:
  with open(p.log) as f:
    return f.read()


def _run(workdir, data, *extra, fsize=None):
  p = _start(workdir, data, *extra, fsize=fsize)
  return p.wait(timeout=TIMEOUT_S), _output(p)


def _wait_for(predicate, proc):
  deadline = time.time() + TIMEOUT_S
  while not predicate():
    assert proc.poll() is None, _output(proc)[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


def test_a_run_through_every_fault_ends_where_an_uninterrupted_run_ends(toy, tmp_path):
  rng = np.random.default_rng(FAULT_SEED)
  rc, out = _run(tmp_path / "ref", toy)
  assert rc == 0, out[-3000:]
  run = tmp_path / "run"

  # Killed inside its second save, after Orbax committed the files but before their record.
  rc, out = _run(run, toy, "--kill_in_save", "2")
  assert rc == -signal.SIGKILL and saved_steps(run) == [4]

  # A NaN state at the next save: refused, nothing saved. Step 8, committed by Orbax and whole
  # but unrecorded, is verified by reading it back, recorded and resumed from (with its row).
  rc, out = _run(run, toy, "--nan_at_step", "12")
  assert rc != 0 and "checkpoints/8 had no integrity record" in out, out[-3000:]
  assert "resuming" in out and "at epoch 2, step 4 of 4" in out, out[-3000:]
  assert "at step 12 holds" in out and "non-finite value(s)" in out and "it is not saved" in out
  assert saved_steps(run) == [4, 8]

  # A full disk (a file-size limit): the save fails with a clear message, step 8 is kept.
  rc, out = _run(run, toy, fsize=64 * 1024)
  assert rc != 0 and "could not write checkpoint 12" in out, out[-3000:]
  assert "the checkpoints before it are kept" in out and saved_steps(run) == [4, 8]

  # kill -9 at a random moment (FAULT_SEED draws it: start-up and compile, training or a save),
  # drawn on the run's own progress rather than the clock, so that it falls inside the run on a
  # machine of any speed and with or without a warm compilation cache: up to 3 s after the
  # start, or after the first of the two epochs left (3 and 4) ends.
  p = _start(run, toy)
  if rng.integers(2):
    _wait_for(lambda: "Epoch   3 |" in _output(p), p)
  time.sleep(float(rng.uniform(0.0, 3.0)))
  p.send_signal(signal.SIGKILL)
  p.wait()

  # The newest checkpoint damaged: one byte changed, a file truncated, or a file deleted.
  newest = run / "checkpoints" / str(saved_steps(run)[-1])
  files = sorted(str(f) for f in newest.rglob("*") if f.is_file() and f.stat().st_size > 0)
  victim = files[int(rng.integers(len(files)))]
  damage = ["flip", "truncate", "delete"][int(rng.integers(3))]
  if damage == "flip":
    blob = bytearray(open(victim, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(blob))
  elif damage == "truncate":
    os.truncate(victim, os.path.getsize(victim) // 2)
  else:
    os.remove(victim)

  # The next run names the damage; a concurrent run is refused naming it; SIGTERM, sent once it
  # has named the damage (its signal handlers are on by then), stops it at its first step
  # boundary with a save. The run is paused (SIGSTOP) while the second one is refused: with one
  # epoch left it could otherwise end before the second run has started.
  p = _start(run, toy)
  _wait_for(lambda: (run / ".lock").exists() and f"pid {p.pid} " in (run / ".lock").read_text(),
            p)
  p.send_signal(signal.SIGSTOP)
  rc, out = _run(run, toy)
  p.send_signal(signal.SIGCONT)
  assert rc != 0 and f"in use by a live run (pid {p.pid} " in out, out[-3000:]
  _wait_for(lambda: f"{newest} is damaged" in _output(p), p)
  p.send_signal(signal.SIGTERM)
  p.wait(timeout=TIMEOUT_S)
  out = _output(p)
  assert p.returncode == 0, out[-3000:]
  assert f"{newest} is damaged" in out and "moved to" in out
  assert "stopped by SIGTERM" in out, out[-3000:]

  # Continued with the same command: where the uninterrupted run ends, bit for bit. Both are
  # processes on this machine with the same XLA_FLAGS running the same compiled programs (one
  # device, one step a call) on the same inputs; XLA:CPU's results are deterministic there.
  rc, out = _run(run, toy)
  assert rc == 0 and "resuming" in out, out[-3000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} (FAULT_SEED={FAULT_SEED})")
  rows = (run / "training_results.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["001", "002", "003", "004"]
