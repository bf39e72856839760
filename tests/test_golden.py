"""The golden tiny run (tests/golden_run.py) gives the numbers stored in
tests/data/golden_tiny_run.json: per-epoch losses, the final variables (by hash) and the
evaluation table, on both input paths. A refactor must leave them exactly as they are; a change
meant to alter them rewrites the file (``python tests/golden_run.py``) in its own commit."""

import json

import pytest

pytest.importorskip("tensorflow")       # the tf.data input path is half of the run

from golden_run import GOLDEN, golden_run, versions  # noqa: E402


def test_golden_tiny_run_is_unchanged(tmp_path):
  stored = json.load(open(GOLDEN))
  runs = golden_run(str(tmp_path))
  assert sorted(runs) == sorted(stored["runs"])
  exact = versions() == stored["versions"]
  for name, want in stored["runs"].items():
    got = runs[name]
    for key in ("train_loss", "test_loss", "test_error"):
      assert got[key] == (want[key] if exact else pytest.approx(want[key], rel=1e-4)), (name, key)
    if exact:            # the same XLA build: bit for bit
      assert got["params_sha256"] == want["params_sha256"], name
      assert got["batch_stats_sha256"] == want["batch_stats_sha256"], name
    else:
      assert got["params_sums"] == pytest.approx(want["params_sums"], rel=1e-3, abs=1e-4), name
    if "evaluation" in want:
      assert json.loads(json.dumps(got["evaluation"])) == (
          want["evaluation"] if exact else pytest.approx(want["evaluation"], abs=1e-3)), name
