"""The golden tiny run (tests/golden_run.py) gives the numbers stored in
tests/data/golden_tiny_run.json: per-epoch losses, the final variables (by hash and by sums) and
the evaluation table, on both input paths. A refactor must leave them as they are; a change
meant to alter them rewrites the file (``python tests/golden_run.py``) in its own commit."""

import json

import pytest

pytest.importorskip("tensorflow")       # the tf.data input path is half of the run

from golden_run import GOLDEN, fingerprint, golden_run, kind, _numbers  # noqa: E402


def test_golden_tiny_run_is_unchanged(tmp_path):
  stored = json.load(open(GOLDEN))
  runs = golden_run(str(tmp_path))
  assert sorted(runs) == sorted(stored["runs"])
  if fingerprint() == stored["fingerprint"]:
    # Bit for bit: the same JAX build emits the same code for the same CPU model and instruction
    # sets, and the run is deterministic (fixed seeds, one process).
    assert json.loads(json.dumps(runs)) == stored["runs"]
    return
  # Another CPU (or jax build): within the tolerances stored beside the recording, each a
  # multiple of the largest difference measured with XLA:CPU held to smaller instruction sets.
  tolerance = stored["tolerance"]
  want, got = _numbers(stored["runs"]), _numbers(runs)
  assert got.keys() == want.keys()
  for key, w in want.items():
    if kind(key) == "relative":
      assert abs(got[key] - w) <= tolerance["relative"] * max(abs(w), 1.0), key
    else:
      assert abs(got[key] - w) <= tolerance[kind(key)], key
