"""A run, its evaluation and an exported detector with a ``gs://`` workdir, through a bucket faked
by a local folder (:mod:`fake_gcs`): the same numbers and files as on a disk, nothing written to a
local ``gs:`` path, and a damaged checkpoint in the bucket moved aside."""

import json
import os
import re

import jax
import numpy as np
import pytest

from energy_jax import checkpoints, config as config_lib, detectors, export, storage, train
from energy_jax.data import augment, toy
from energy_jax.ood import evaluation
from fake_gcs import fake_gcs  # noqa: F401  (the fixture)
from test_checkpoints import _files_in, _run_stopped


@pytest.fixture(scope="module")
def toy_id(tmp_path_factory):
  d = tmp_path_factory.mktemp("bucket_toy")
  path, _ = toy.make_toy_dataset(str(d), train_per_class=16, test_per_class=4, num_outliers=16)
  return path                      # 64 training images: 4 steps of 16 per epoch


def _config(toy_id):
  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = toy_id
  # Two steps a call, as tests/test_checkpoints.py's runs (a stop can fall inside an epoch).
  c.num_devices, c.epochs, c.steps_per_call, c.keep_checkpoints = 1, 2, 2, 1
  c.tensorboard = False         # TensorFlow's event writer reaches gs:// itself, not faked here
  return c


def _files(folder):
  return {os.path.relpath(os.path.join(d, n), folder)
          for d, _, names in os.walk(folder) for n in names}


def _layout(folder):
  """The files below ``folder``, OCDBT's data files (random names, a number that depends on
  the storage) as one."""
  return {re.sub(r"/d/[0-9a-f]{32}$", "/d/DATA", f) for f in _files(folder)}


def test_a_preempted_run_in_a_bucket_resumes_to_the_run_on_disk(toy_id, tmp_path, fake_gcs,
                                                                  monkeypatch):
  c = _config(toy_id)
  full = train.train_and_evaluate(c, str(tmp_path / "disk"), log=lambda s: None)
  said = []
  assert _run_stopped(c, "gs://bucket/run", monkeypatch, 2, said.append)["preempted"]  # 2, 2/4
  assert any("is in a bucket, which has no file locks" in s for s in said)
  resumed = train.train_and_evaluate(c, "gs://bucket/run", log=said.append)
  assert any("resuming gs://bucket/run at epoch 2, step 2 of 4" in s for s in said)
  # Bit for bit, here and below: both runs call the same compiled steps (one device, two steps
  # a call) on the same inputs in this process; where the files are kept changes no number.
  assert resumed["train_loss"] == full["train_loss"]
  bucket = fake_gcs / "bucket" / "run"
  # The same files as on the disk (where the lock's holder file goes with the run).
  on_disk, in_bucket = _layout(tmp_path / "disk"), _layout(bucket)
  assert on_disk == in_bucket
  assert sorted(os.listdir(bucket / "checkpoints")) == ["8"]          # keep_checkpoints = 1
  assert os.listdir(bucket / "checkpoints.sha256") == ["8.json"]
  rows = lambda d: [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")}
                    for l in open(d / "results.jsonl")]
  assert rows(bucket) == rows(tmp_path / "disk")                       # one row per epoch
  csv = lambda d: [l.split(",")[::2] for l in open(d / "training_results.csv")]  # not the times
  assert csv(bucket) == csv(tmp_path / "disk")
  assert json.load(open(bucket / "config.json")) == json.loads(c.to_json())
  disk = checkpoints.load_variables(str(tmp_path / "disk"), c)
  remote = checkpoints.load_variables("gs://bucket/run", c)
  for x, y in zip(jax.tree_util.tree_leaves(disk), jax.tree_util.tree_leaves(remote)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Evaluation reads the bucket's checkpoint and writes its tables and plots there. Bit for bit:
  # the same variables through the same compiled programs in this process.
  run = lambda ckpt, out: evaluation.run(
      c, ckpt, {"noise": "synthetic:uniform_noise"}, out, [detectors.create("energy")],
      num_to_avg=2, log=lambda s: None, progress_bar=False)
  want, got = run(str(tmp_path / "disk"), str(tmp_path / "eval")), run("gs://bucket/run",
                                                                         "gs://bucket/eval")
  assert got["results"] == want["results"]
  assert _files(fake_gcs / "bucket" / "eval") == _files(tmp_path / "eval") == {
      "ood_results.json", "ood_results.csv", "energy_histograms.png", "roc_energy.png"}
  assert json.load(open(fake_gcs / "bucket" / "eval" / "ood_results.json"))["results"] == \
      json.load(open(tmp_path / "eval" / "ood_results.json"))["results"]

  # A changed byte in the bucket's checkpoint: named and moved aside inside the bucket.
  victim = max(_files_in(bucket / "checkpoints" / "8"), key=os.path.getsize)
  blob = bytearray(open(victim, "rb").read())
  blob[len(blob) // 2] ^= 0xFF
  open(victim, "wb").write(bytes(blob))
  said.clear()
  with checkpoints.RunCheckpoints("gs://bucket/run", log=said.append) as ckpts:
    assert ckpts.latest_intact_step() is None
  assert said == [said[0]] and "gs://bucket/run/checkpoints/8 is damaged (file(s) changed" in said[0]
  assert os.listdir(bucket / "checkpoints") == []
  assert [n.split("-")[0] for n in os.listdir(bucket / "checkpoints.damaged")] == ["8"]


def test_an_exported_detector_round_trips_through_a_bucket(fake_gcs):
  from energy_jax import models
  c = config_lib.get_config("test", "pretrain")
  variables = models.init_variables(models.from_config(c), jax.random.PRNGKey(0))
  det = detectors.create("energy")
  path = export.save("gs://bucket/artifact", config=c, variables=variables, detector=det,
                     params={}, threshold=-2.5)
  assert path == "gs://bucket/artifact" and (fake_gcs / "bucket" / "artifact").is_dir()
  with pytest.raises(FileExistsError, match="gs://bucket/artifact exists"):
    export.save(path, config=c, variables=variables, detector=det, params={}, threshold=-2.5)
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  is_ood = export.load(path)
  logits = models.from_config(c).apply(variables, augment.normalize(images), train=False).logits
  want = np.asarray(jax.nn.logsumexp(logits, axis=1))
  # Two programs (the artifact's jit, the model then logsumexp): float32 rounding apart. Measured
  # max rel diff 9.5e-8 (native AVX2, AVX, SSE4_2; 2026-12-06): 100x under the tolerance.
  np.testing.assert_allclose(np.asarray(is_ood.scores(images)), want, rtol=1e-5, atol=1e-5)
  # Exact: every score lies far from the threshold, so no rounding can flip a flag.
  assert np.min(np.abs(want - (-2.5))) > 1e-2
  np.testing.assert_array_equal(np.asarray(is_ood(images)), want < -2.5)


def test_a_write_cut_short_on_a_disk_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = tmp_path / "run" / "training_results.csv"
  storage.write_text(path, "epoch\n001\n")
  def full_disk(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space left on device"):
    storage.write_text(path, "epoch\n001\n002\n")
  assert path.read_text() == "epoch\n001\n"
  assert os.listdir(path.parent) == ["training_results.csv"]       # no temporary file left
