"""benchmarks/reproduce.py refuses a work directory that holds a run, before it starts anything."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_a_non_empty_workdir_and_keeps_it(tmp_path):
  kept = tmp_path / "pretrain" / "checkpoints" / "99" / "state"
  kept.parent.mkdir(parents=True)
  kept.write_text("a finished run")
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "reproduce.py"),
                        "--smoke", "--workdir", str(tmp_path), "--data", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XLA_FLAGS=""))
  assert out.returncode == 2, out.stdout + out.stderr
  assert f"{tmp_path / 'pretrain'} is not empty" in out.stderr
  assert "nothing was deleted" in out.stderr
  assert kept.read_text() == "a finished run"
  assert "[stage]" not in out.stdout                    # nothing was compiled or trained
