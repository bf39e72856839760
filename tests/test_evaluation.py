import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from energy_jax import config as config_lib, data, detectors, models, train
from energy_jax.data import augment, toy
from energy_jax.ood import evaluation, metrics, report
from conftest import REPO, shared_pack


def _set(images, labels=None):
  labels = np.zeros(len(images), np.int32) if labels is None else labels
  return data.ImageSet(images, labels.astype(np.int32),
                           tuple(str(i) for i in range(int(labels.max()) + 1)), "mem")


class StubScorer(evaluation.Scorer):
  """Known logits: image k (its first pixel holds k) has logits [v_k, 0]."""

  def __init__(self, values):
    super().__init__(model=None, variables=None)
    self.values = np.asarray(values, np.float32)

  def outputs(self, images, blocks=False):
    v = self.values[images[:, 0, 0, 0].astype(int)]
    features = np.zeros((len(v), 1), np.float32)
    return models.ModelOutput(np.stack([v, np.zeros_like(v)], 1), features, (features,))


def _indexed_images(start, n):
  x = np.zeros((n, 32, 32, 3), np.uint8)
  x[:, 0, 0, 0] = np.arange(start, start + n)
  return x


def test_stub_model_gives_hand_computed_fpr_and_auroc():
  # ID logits 1..20, OOD logits 0.5, 10.5, 19.5, -3 (energy is monotone in the logit here).
  values = np.r_[np.arange(1, 21), [0.5, 10.5, 19.5, -3.0]]
  scorer = StubScorer(values)
  test = _set(_indexed_images(0, 20), np.arange(20) % 2)
  ood = {"stub": _set(_indexed_images(20, 4))}            # len(test)//5 = 4: all of it each draw
  res = evaluation.evaluate(scorer, test, ood, [detectors.create("energy")], num_to_avg=3)
  m = res["energy (T=1)"]["stub"]
  # TPR 95% = 19 of 20 ID above the threshold (logit 2): OOD 10.5 and 19.5 pass -> FPR 2/4.
  assert m["fpr"] == pytest.approx(0.5) and m["fpr_std"] == 0.0
  # ID > OOD pairs: 20 + 10 + 1 + 20 = 51 of 80.
  assert m["auroc"] == pytest.approx(51 / 80)
  assert res["energy (T=1)"]["mean"]["auroc"] == pytest.approx(51 / 80)


def test_table_equals_metrics_on_the_same_scores():
  model = models.WideResNet(10, 1, 3, 0.0)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  test = _set(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), np.arange(50) % 3)
  ood = {"a": _set(rng.integers(0, 80, (30, 32, 32, 3), dtype=np.uint8)),
         "b": _set(rng.integers(100, 256, (14, 32, 32, 3), dtype=np.uint8))}
  scorer = evaluation.Scorer(model, variables, batch_size=16)
  specs = [detectors.create("msp"), detectors.create("energy", temperature=2.0)]
  res = evaluation.evaluate(scorer, test, ood, specs, num_to_avg=3, seed=7, log=lambda s: None)
  # Independent recomputation: logits straight from the model, scores with numpy, the same draws.
  def logits_of(images):
    return np.asarray(model.apply(variables, augment.normalize(images)).logits, np.float64)
  score_fns = {"msp": lambda l: np.exp(l.max(1) - logsumexp(l, 1)),
               "energy (T=2)": lambda l: 2.0 * logsumexp(l / 2.0, 1)}
  table = report.markdown_table(res, list(ood))
  for label, fn in score_fns.items():
    s_in = fn(logits_of(test.images))
    per_set = []
    for i, (name, o) in enumerate(ood.items()):
      s_out = fn(logits_of(o.images))
      draw_rng = np.random.default_rng(7 + i)
      runs = [metrics.ood_metrics(s_in, s_out[draw_rng.permutation(len(s_out))[:10]])
              for _ in range(3)]
      for key in ("fpr", "auroc", "aupr_in", "aupr_out", "detection_error"):
        want = np.mean([r[key] for r in runs])
        assert res[label][name][key] == pytest.approx(want, abs=1e-5), (label, name, key)
      per_set.append(res[label][name])
      assert f"{100 * res[label][name]['auroc']:.2f}" in table
    assert res[label]["mean"]["fpr"] == pytest.approx(np.mean([p["fpr"] for p in per_set]))


def test_small_ood_set_is_used_whole_and_said():
  scorer = StubScorer(np.r_[np.arange(1, 21), [0.5, 3.0]])
  test = _set(_indexed_images(0, 20), np.arange(20) % 2)
  said = []
  res = evaluation.evaluate(scorer, test, {"tiny": _set(_indexed_images(20, 2))},
                            [detectors.create("msp")], log=said.append)
  assert res["msp"]["tiny"]["num_ood"] == 2
  assert any("tiny has 2 images, fewer than 4: using all" in s for s in said)


def test_bad_evaluation_inputs():
  with pytest.raises(ValueError, match="unknown detector 'knn'; registered: .*energy"):
    detectors.create("knn")
  with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['T'\]; it has \['temperature'\]"):
    detectors.create("energy", T=2.0)
  with pytest.raises(ValueError, match="single class"):
    evaluation.classification_report(np.zeros((4, 3)), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="no OOD sets"):
    evaluation.evaluate(StubScorer([1.0]), _set(_indexed_images(0, 1)), {}, [])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  d = tmp_path_factory.mktemp("evalrun")
  toy_id, _ = toy.make_toy_dataset(str(d / "data"), train_per_class=32, test_per_class=16,
                                   num_outliers=64)
  c = config_lib.get_config("test", "pretrain")
  c.in_train = c.in_test = toy_id
  c.epochs, c.num_devices = 1, 1
  train.train_and_evaluate(c, str(d / "run"), log=lambda s: None)
  return toy_id, str(d / "run")


def _evaluate(toy, ckpt, workdir, *extra):
  cmd = [sys.executable, "experiments/evaluate.py", "--config=experiments/configs/pretrain.py:test",
         f"--config.in_train={toy}", f"--config.in_test={toy}", f"--checkpoint={ckpt}",
         f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)


def test_evaluate_script_end_to_end_on_tin32_ood(tiny_checkpoint, tmp_path):
  pack = shared_pack("tin32-ood.zip")
  toy, ckpt = tiny_checkpoint
  out = _evaluate(toy, ckpt, tmp_path, f"--ood=tin32={pack},noise=synthetic:uniform_noise",
                  "--num_to_avg=2")
  assert out.returncode == 0, out.stdout + out.stderr
  assert "| tin32 |" in out.stdout and "| **mean** |" in out.stdout
  saved = json.load(open(tmp_path / "ood_results.json"))
  assert set(saved["results"]) == {"msp", "energy (T=1)", "odin (T=1000, eps=0.0014)",
                                   "mahalanobis (eps=0.0014)"}
  assert saved["results"]["msp"]["tin32"]["num_ood"] == (16 * 4) // 5      # len(test) // 5
  for name in ("ood_results.csv", "energy_histograms.png", "roc_energy.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_evaluate_script_rejects_unknown_names(tiny_checkpoint, tmp_path):
  toy, ckpt = tiny_checkpoint
  out = _evaluate(toy, ckpt, tmp_path, "--ood=cifar11")
  assert out.returncode != 0 and "unknown OOD set 'cifar11'" in out.stderr
  out = _evaluate(toy, ckpt, tmp_path, "--ood=n=synthetic:uniform_noise", "--detectors=knn")
  assert out.returncode != 0 and "unknown detector(s) ['knn']" in out.stderr
