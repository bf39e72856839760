"""One run over 2 local processes x 2 CPU devices (jax.distributed on 127.0.0.1) computes what one
process with 4 devices computes, on both input paths; one writer; killed, or one process sent
SIGTERM, and rerun, it resumes to the uninterrupted run; a sweep in member groups (one per process,
one spanning both, two in each) computes what one process computes and resumes after SIGTERM;
evaluate.py gives the one-process table."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from test_train import child_xla_flags, saved_steps

pytestmark = pytest.mark.heavy
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(num_processes, devices_per_process, workdir, data, pipeline, epochs=2,
           steps_per_call=1, sweep_groups="", sweep_only=False, sweep_members=2):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=child_xla_flags(
                 f"--xla_force_host_platform_device_count={devices_per_process}"))
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    cmd = [sys.executable, WORKER, "--workdir", str(workdir), "--data", str(data),
           "--pipeline", pipeline, "--epochs", str(epochs),
           "--steps_per_call", str(steps_per_call), "--sweep_groups", sweep_groups]
    cmd += ["--sweep_members", str(sweep_members)] + (["--sweep_only"] if sweep_only else [])
    if num_processes > 1:
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
              "--process_id", str(pid)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _loss(out):
  return float(out.split("train_loss ")[1].split()[0])


def _compare_params(a_path, b_path, scale_tol, atol=1e-7):
  """Each tensor within ``scale_tol`` of its largest entry plus ``atol``; the largest difference
  as a share of its tensor's largest entry."""
  a, b = np.load(a_path), np.load(b_path)
  assert sorted(a.files) == sorted(b.files)
  worst = 0.0
  for k in a.files:
    x, y = a[k].astype(np.float64), b[k].astype(np.float64)
    assert np.max(np.abs(x - y)) <= scale_tol * np.max(np.abs(y)) + atol, k
    worst = max(worst, np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
  return worst


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  from energy_jax.data import toy as toy_data
  d = tmp_path_factory.mktemp("mp_data")
  toy_data.make_toy_dataset(str(d), train_per_class=21, test_per_class=8, num_outliers=64)
  return d                         # 84 training images at batch 16: 6 steps, the last of 4


@pytest.mark.parametrize("pipeline", ["device", "tfdata"])
def test_two_processes_of_two_devices_compute_what_one_of_four_computes(toy, tmp_path, pipeline):
  """The run, then (device input) a sweep of two members in 2 member groups: on 2 processes,
  each process's devices a group; and on 2 processes in 1 group, the members data-parallel over
  the devices of both."""
  sweeps = pipeline == "device"
  groups = "2,1" if sweeps else ""
  one = _finish(_start(1, 4, tmp_path / "one", toy, pipeline, sweep_groups=groups))
  two = _finish(_start(2, 2, tmp_path / "two", toy, pipeline, sweep_groups=groups))
  assert "process 0 of 1, 4 devices" in one[0]
  assert "process 0 of 2, 4 devices" in two[0] and "process 1 of 2, 4 devices" in two[1]
  # Dropout is on: two programs (2 x 2 devices, 1 x 4), equal up to the devices' summation order
  # (a crop, mask or batch drawn differently moves the loss by percents). The processes of a run
  # print the same all-reduced loss. Measured (2026-12-07, XLA:CPU with AVX-512, one step a
  # call): loss 1.8e-8; weights at most 0.04% of scale_tol on tensors reaching 1e-2, and 5.1e-8
  # on the small ones (entries below 4e-3, e.g. BatchNorm biases: their sums cancel); with the
  # randomness drawn per fold_in key (before energy_jax/example_bits.py), held to SSE4_2, AVX,
  # AVX2: 5.9e-8, 0.6%, 3.9e-7. Hence atol 1e-5.
  assert _loss(two[0]) == _loss(two[1]) == pytest.approx(_loss(one[0]), rel=1e-5)
  _compare_params(tmp_path / "two.npz", tmp_path / "one.npz", scale_tol=1e-3, atol=1e-5)
  # One writer: one row per epoch, one log.
  rows = (tmp_path / "two" / "training_results.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["001", "002"]
  assert "Epoch   1" in two[0] and "Epoch   1" not in two[1]
  # Values to replicate that differ between the processes (each passes its rank) are refused on
  # both, naming what differs.
  for out in two:
    assert "put_replicated refused: put_replicated: the 1 values to replicate differ" in out, out
  if sweeps:
    _compare_sweeps(tmp_path / "two_sweep", tmp_path / "one_sweep", 2, one + two,
                    [one[0], two[0]])
    _compare_sweeps(tmp_path / "two_sweep_g1", tmp_path / "one_sweep_g1", 1, one + two,
                    [one[0], two[0]])


def _compare_sweeps(a, b, groups, outs, logs, members=2, atol=1e-8):
  """Each of the ``members`` of sweep ``a`` (2 processes of 2 devices) against the same member of
  ``b`` (one process of 4 devices, or 2 x 2 again), both in ``groups`` member groups, and the
  choice of both on validation data. Programs partitioned for 2 processes differ from one
  process's (as the run's above). For one epoch of two members, measured (2026-12-07, XLA:CPU
  with AVX-512 / held to SSE4_2; the test prints them): the epoch's losses at most 4.6e-8 apart
  (relative), the weights within 8.7e-7 of each tensor's largest entry, but in 1 group member
  1's BatchNorm biases, entries below 3.4e-5 whose sums cancel, 1.6e-9 apart (4.8e-5 of their
  largest): 1e-5 of the largest entry plus ``atol`` allowed; the validation AUROCs equal. One
  swap of two scores would move an AUROC by 1/(ID x OOD images): 1e-3 allowed."""
  for out in outs:
    assert (f"sweep in {groups} group(s): members {['finished'] * members}, chosen" in out), \
        out[-3000:]
  tables = [json.loads((s / "validation.json").read_text()) for s in (a, b)]
  assert tables[0]["chosen"] == tables[1]["chosen"]
  for out in logs:            # process 0's log of each (in 1 group: the run's line, the sweep's)
    assert (f"4 device(s) in {groups} member groups x" in out if groups > 1
            else out.count("4 device(s) x") == 2), out[-3000:]
  for k in range(members):
    dirs = [sorted((s / "members").iterdir())[k] for s in (a, b)]
    rows = [json.loads((d / "results.jsonl").read_text().splitlines()[-1]) for d in dirs]
    weights = _compare_params(f"{a}_{k}.npz", f"{b}_{k}.npz", scale_tol=1e-5, atol=atol)
    aurocs = [t["members"][k]["auroc"] for t in tables]
    print(f"member {k}: loss {abs(rows[0]['train_loss'] / rows[1]['train_loss'] - 1):.2g} "
          f"relative, weights {weights:.2g} of a tensor's largest entry, validation AUROC "
          f"{abs(aurocs[0] - aurocs[1]):.2g} apart")           # (pytest -s)
    assert rows[0]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-6)
    assert aurocs[0] == pytest.approx(aurocs[1], abs=1e-3)


def test_both_processes_killed_then_one_sent_sigterm_resume_to_the_uninterrupted_run(toy,
                                                                                   tmp_path):
  # One step per call: a stop can fall inside an epoch.
  full = _finish(_start(2, 2, tmp_path / "full", toy, "device", epochs=3, steps_per_call=1))
  procs = _start(2, 2, tmp_path / "cut", toy, "device", epochs=3, steps_per_call=1)
  deadline = time.time() + TIMEOUT_S
  while len(saved_steps(tmp_path / "cut")) < 1 and time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert saved_steps(tmp_path / "cut")
  # Rerun; SIGTERM to process 1 only: both stop at the same step, saved.
  before = saved_steps(tmp_path / "cut")
  procs = _start(2, 2, tmp_path / "cut", toy, "device", epochs=3, steps_per_call=1)
  while saved_steps(tmp_path / "cut") == before and time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before the signal"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  stopped = _finish(procs)
  assert "resuming" in stopped[0]
  if "preempted" in stopped[0]:                      # (else it had just finished)
    where = [out.split("preempted at ")[1].split()[:3] for out in stopped]
    assert where[0] == where[1], where
    resumed = _finish(_start(2, 2, tmp_path / "cut", toy, "device", epochs=3, steps_per_call=1))
    assert "resuming" in resumed[0]
  else:
    resumed = stopped
  # Both runs: 2 x 2 devices, one step a call, the same programs on this machine (measured equal
  # bit for bit, SSE4_2); within 1e-5 claimed.
  assert _loss(resumed[0]) == pytest.approx(_loss(full[0]), rel=1e-5)
  _compare_params(tmp_path / "cut.npz", tmp_path / "full.npz", scale_tol=1e-5)
  rows = (tmp_path / "cut" / "training_results.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["001", "002", "003"]


def test_a_sweep_in_two_member_groups_per_process_matches_one_process_and_resumes(toy, tmp_path):
  """A sweep of four members in 4 member groups (a device each) on 2 processes x 2 devices, two
  groups in each process: against the same sweep on one process of 4 devices; then SIGTERM to
  process 1 once the members saved their first epoch, and the same command again: both processes
  stop at the same step, and the sweep resumes as a whole to the members and the choice of the
  sweep run without a stop."""
  def sweep(name, processes=2, devices=2):
    return _start(processes, devices, tmp_path / name, toy, "device", epochs=3,
                  sweep_groups="4", sweep_only=True, sweep_members=4)

  full = _finish(sweep("full"))
  one = _finish(sweep("one", 1, 4))
  # Three epochs (the comparisons above run one): measured (2026-12-07, XLA:CPU with AVX-512 /
  # held to SSE4_2) losses at most 4.9e-8 apart (relative), tensors reaching 1e-2 within 5.0e-7
  # of their largest entry, small BatchNorm biases (whose sums cancel) past 1e-5 of their
  # largest entry by at most 4.6e-8; the AUROCs and the choice equal. Allowed: atol 1e-6.
  _compare_sweeps(tmp_path / "full_sweep", tmp_path / "one_sweep", 4, full + one,
                  [full[0], one[0]], members=4, atol=1e-6)
  procs = sweep("cut")
  members = tmp_path / "cut_sweep" / "members"
  deadline = time.time() + TIMEOUT_S
  while not (members.exists() and all(saved_steps(m) for m in members.iterdir())) and (
      time.time() < deadline):
    assert all(p.poll() is None for p in procs), "a process ended before the signal"
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  stopped = _finish(procs)
  if "preempted" in stopped[0]:                      # (else it had just finished)
    where = [out.split("preempted at ")[1].split()[:4] for out in stopped]
    assert where[0] == where[1], where
    resumed = _finish(sweep("cut"))
    assert "resuming the sweep at epoch" in resumed[0], resumed[0][-3000:]
  else:
    resumed = stopped
  print(f"stopped: {'preempted' in stopped[0]}")                            # (pytest -s)
  # The same programs on the same 2 x 2 devices: within 1e-5 of each tensor's largest entry
  # claimed, as the single run's resume above.
  _compare_sweeps(tmp_path / "cut_sweep", tmp_path / "full_sweep", 4, resumed,
                  [resumed[0], full[0]], members=4)


def _evaluate(toy, ckpt, workdir, num_processes, devices_per_process):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=child_xla_flags(
                 f"--xla_force_host_platform_device_count={devices_per_process}"))
  cmd = [sys.executable, "experiments/evaluate.py", "--config=experiments/configs/pretrain.py:test",
         f"--config.in_train={toy / 'toy_id.zip'}", f"--config.in_test={toy / 'toy_id.zip'}",
         f"--checkpoint={ckpt}", f"--workdir={workdir}", "--num_to_avg=2", "--noprogress",
         f"--ood=outliers={toy / 'toy_outliers.npy'},noise=synthetic:uniform_noise",
         "--detectors=msp,energy,odin,mahalanobis,knn,react"]
  port = _free_port()
  procs = [subprocess.Popen(cmd + ([f"--coordinator_address=127.0.0.1:{port}",
                                    f"--num_processes={num_processes}", f"--process_id={i}"]
                                   if num_processes > 1 else []),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(num_processes)]
  return _finish(procs)


def test_evaluate_under_two_processes_gives_the_single_process_table(toy, tmp_path):
  _finish(_start(1, 1, tmp_path / "run", toy, "device", epochs=1))
  one = _evaluate(toy, tmp_path / "run", tmp_path / "one", 1, 4)
  two = _evaluate(toy, tmp_path / "run", tmp_path / "two", 2, 2)
  a = json.load(open(tmp_path / "one" / "ood_results.json"))["results"]
  b = json.load(open(tmp_path / "two" / "ood_results.json"))["results"]
  assert sorted(a) == sorted(b) and len(a) == 6
  for detector in a:
    for ood_set, metrics in a[detector].items():
      for metric, value in metrics.items():
        # Two programs (1 x 4 devices, 2 x 2): measured equal (SSE4_2); the rank metrics move
        # only if a near-tie of scores swaps.
        assert b[detector][ood_set][metric] == pytest.approx(value, abs=1e-6), (
            detector, ood_set, metric)
  # One writer: the table is printed by process 0 only.
  assert "| **mean** |" in two[0] and "| **mean** |" not in two[1]
