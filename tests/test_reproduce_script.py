"""benchmarks/reproduce.py refuses a work directory that holds a run, before it starts anything;
it adds convolutions to XLA's CUDA graphs unless told otherwise."""

import os
import subprocess
import sys

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
