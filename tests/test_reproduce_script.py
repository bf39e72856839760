"""benchmarks/reproduce.py refuses a work directory that holds a run, before it starts anything;
it adds convolutions to XLA's CUDA graphs unless told otherwise."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused_run(workdir, xla_flags, *args):
  """reproduce.py on a work directory that holds a run (the output and the run's file kept): it
  starts the backend, then refuses."""
  kept = workdir / "pretrain" / "checkpoints" / "99" / "state"
  kept.parent.mkdir(parents=True, exist_ok=True)
  kept.write_text("a finished run")
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "reproduce.py"),
                        "--smoke", "--workdir", str(workdir), "--data", str(workdir / "none"),
                        *args], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XLA_FLAGS=xla_flags))
  assert out.returncode == 2, out.stdout + out.stderr
  return out, kept


def test_refuses_a_non_empty_workdir_and_keeps_it(tmp_path):
  out, kept = refused_run(tmp_path, "")
  assert f"{tmp_path / 'pretrain'} is not empty" in out.stderr
  assert "nothing was deleted" in out.stderr
  assert kept.read_text() == "a finished run"
  assert "[stage]" not in out.stdout                    # nothing was compiled or trained


def test_adds_convolutions_to_xla_cuda_graphs_unless_told_otherwise(tmp_path):
  # The device line is printed once the backend has started with these XLA_FLAGS (XLA aborts on
  # a value it does not know, so the run getting this far is the check that this jaxlib knows it).
  conv = "--xla_gpu_enable_command_buffer=+CONVOLUTION"
  cases = [("", [], conv),
           ("--xla_force_host_platform_device_count=2", [],
            "--xla_force_host_platform_device_count=2 " + conv),
           ("", ["--no-gpu-conv-graphs"], ""),
           ("--xla_gpu_enable_command_buffer=", [], "--xla_gpu_enable_command_buffer=")]
  for flags, args, expected in cases:
    out, _ = refused_run(tmp_path, flags, *args)
    assert f"XLA_FLAGS={expected!r}" in out.stdout, (flags, args, out.stdout)


def test_compiled_ahead_is_what_the_run_calls(tmp_path):
  """State creation, epoch and evaluation compiled ahead by reproduce.py (pretraining from
  scratch, then fine-tuning around its weights) are the executables the runs call: nothing heavy
  is traced or compiled again, and no persistent cache is needed for that (it is off here: a
  program loaded from it is no compilation, and would not be counted). The count is every
  program the two runs compile: one epoch program per stage (the steps in a loop, as on
  accelerators: an epoch of 5 steps runs calls of 4 and 1, the second padded to 4), one state
  creation per stage and one evaluation for both."""
  from energy_jax.data import toy
  toy_id, toy_out = toy.make_toy_dataset(str(tmp_path / "data"), train_per_class=32,
                                         test_per_class=8, num_outliers=64)
  script = f"""
import logging, sys
import jax
jax.config.update("jax_log_compiles", True)
HEAVY = ("_create_train_state", "eval_step", "per_device")
compiled = []
class Compiled(logging.Handler):
  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("Finished XLA compilation of jit("):
      compiled.append(msg.split("(")[1].split(")")[0])
logging.getLogger("jax").addHandler(Compiled())
sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})
import reproduce
from energy_jax import config, train
for stage in ("pretrain", "finetune"):
  c = config.get_config("test", stage)
  c.in_train = c.in_test = {toy_id!r}
  c.outliers = {toy_out!r}
  c.num_devices, c.epochs, c.train_subset, c.steps_per_call = 1, 1, 80, 4   # 5 steps: calls of 4 + 1
  c.scan_unroll = 1                                # the steps in a loop, as on accelerators
  if stage == "finetune":
    c.pretrained = {str(tmp_path / 'pretrain')!r}
  jobs = reproduce.compile_jobs(stage, c)
  compiled.clear()
  for job in jobs.values():
    job()
  print(stage, "AHEAD", sorted(name for name in compiled if name in HEAVY))
  compiled.clear()
  train.train_and_evaluate(c, {str(tmp_path)!r} + "/" + stage, log=lambda s: None)
  print(stage, "RUN", sorted(name for name in compiled if name in HEAVY))
  print(stage, "RUN ALL", len(compiled), sorted(compiled))
"""
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO, ENERGY_JAX_COMPILATION_CACHE="off")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # One epoch program for both call lengths (4 and 1 steps), the state's creation (fresh, then
  # around the pretrained weights) and the evaluation (the same model and batch: compiled once
  # for both stages) ...
  assert ("pretrain AHEAD ['_create_train_state', 'eval_step', 'per_device']"
          in out.stdout), out.stdout + out.stderr[-2000:]
  assert ("finetune AHEAD ['_create_train_state', 'per_device']"
          in out.stdout), out.stdout + out.stderr[-2000:]
  # ... none of them again in the runs, and the fine-tuning run compiles nothing at all.
  for stage in ("pretrain", "finetune"):
    assert f"{stage} RUN []" in out.stdout, out.stdout + out.stderr[-2000:]
  assert "finetune RUN ALL 0 []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_background_compile_runs_jobs_in_order_and_reraises():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import reproduce
  order = []
  jobs = reproduce.BackgroundCompile([lambda: order.append(1), lambda: order.append(2)])
  assert jobs.wait(0) >= 0 and jobs.wait(1) >= 0 and order == [1, 2]
  failing = reproduce.BackgroundCompile([lambda: order.append(3), lambda: 1 / 0,
                                         lambda: order.append(4)])
  with pytest.raises(RuntimeError, match=r"failed \(job 1, before job 2\)") as e:
    failing.wait()
  assert isinstance(e.value.__cause__, ZeroDivisionError)
  with pytest.raises(RuntimeError, match=r"failed \(job 1\)"):
    failing.wait(1)
  assert failing.wait(0) >= 0 and order == [1, 2, 3]     # the job before the failure counts
