"""The golden tiny run (tests/golden_run.py) gives the numbers stored in
tests/data/golden_tiny_run.json: per-epoch losses, the final variables (by hash and by sums) and
the evaluation table, on both input paths. A refactor must leave them as they are; a change
meant to alter them rewrites the file (``python tests/golden_run.py``) in its own commit."""

import json

import pytest

from golden_run import GOLDEN, PIPELINES, fingerprint, golden_run, kind, _numbers


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_golden_tiny_run_is_unchanged(tmp_path, pipeline):
  """Each input path's runs on their own (two tests that can run side by side)."""
  if pipeline == "tfdata":
    pytest.importorskip("tensorflow")
  stored = json.load(open(GOLDEN))
  stored_runs = {k: v for k, v in stored["runs"].items() if k.startswith(pipeline + "/")}
  runs = golden_run(str(tmp_path), (pipeline,))
  assert stored_runs and sorted(runs) == sorted(stored_runs)
  if fingerprint() == stored["fingerprint"]:
    # Bit for bit: the same JAX build emits the same code for the same CPU model and instruction
    # sets, and the run is deterministic (fixed seeds, one process).
    assert json.loads(json.dumps(runs)) == stored_runs
    return
  # Another CPU (or jax build): within the tolerances stored beside the recording, each a
  # multiple of the largest difference measured with XLA:CPU held to smaller instruction sets.
  tolerance = stored["tolerance"]
  want, got = _numbers(stored_runs), _numbers(runs)
  assert got.keys() == want.keys()
  for key, w in want.items():
    if kind(key) == "relative":
      assert abs(got[key] - w) <= tolerance["relative"] * max(abs(w), 1.0), key
    else:
      assert abs(got[key] - w) <= tolerance[kind(key)], key
