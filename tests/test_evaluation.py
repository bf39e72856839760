import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

import chex
from energy_jax import config as config_lib, data, detectors, models, progress, train
from energy_jax.data import augment, toy
from energy_jax.ood import evaluation, metrics, report
from conftest import REPO, shared_pack
from test_detectors import _counted


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
  # Metrics of hand-made scores: exact fractions of counts.
  # TPR 95% = 19 of 20 ID above the threshold (logit 2): OOD 10.5 and 19.5 pass -> FPR 2/4.
  assert m["fpr"] == pytest.approx(0.5) and m["fpr_std"] == 0.0
  # ID > OOD pairs: 20 + 10 + 1 + 20 = 51 of 80.
  assert m["auroc"] == pytest.approx(51 / 80)
  assert res["energy (T=1)"]["mean"]["auroc"] == pytest.approx(51 / 80)


def test_ood_positive_fpr_hand_computed():
  # Same scores as above. OOD positive: detecting all 4 OOD (>= 95%) needs the threshold at the
  # highest OOD score, 19.5, which also rejects ID 1..19: FPR 19/20, where ID positive gives 2/4.
  scorer = StubScorer(np.r_[np.arange(1, 21), [0.5, 10.5, 19.5, -3.0]])
  test = _set(_indexed_images(0, 20), np.arange(20) % 2)
  ood = {"stub": _set(_indexed_images(20, 4))}
  both = {flag: evaluation.evaluate(scorer, test, ood, [detectors.create("energy")],
                                    ood_positive=flag)["energy (T=1)"]["stub"]
          for flag in (False, True)}
  assert both[False]["fpr"] == pytest.approx(0.5) and both[True]["fpr"] == pytest.approx(0.95)
  assert both[False]["auroc"] == both[True]["auroc"] == pytest.approx(51 / 80)


def _tiny_scorer(batch_size):
  model = models.WideResNet(10, 1, 3, 0.0)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  return evaluation.Scorer(model, variables, batch_size=batch_size,
                           head=models.head("wrn", variables["params"]))


def test_scorer_batches_equal_one_call_for_every_detector():
  """Every detector through the Scorer (fixed batches, the last padded) against the detector
  called once on the model's outputs of the whole set."""
  rng = np.random.default_rng(4)
  scorer = _tiny_scorer(batch_size=16)
  train_images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
  # Centre the random head's logits, then label the training set as predicted: every class has
  # correctly classified examples (SHE's patterns) and examples (the Gaussians).
  logits = scorer.outputs(train_images).logits
  scorer.variables["params"]["fc"]["bias"] -= logits.mean(0)
  scorer.head = models.head("wrn", scorer.variables["params"])
  scorer._outputs.clear()
  train = _set(train_images, scorer.outputs(train_images).logits.argmax(1).astype(np.int32))
  assert len(np.unique(train.labels)) == 3
  val = {"v": _set(rng.integers(0, 90, (18, 32, 32, 3), dtype=np.uint8))}
  images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)        # 16 + 16 + 5 (padded)
  chosen = [detectors.create(n, **({"k": 5} if n == "knn" else {})) for n in detectors.names()]
  scorer.fit(chosen, train, (train, val))
  assert set(scorer.fit_seconds) == {d for d in chosen if d.fit_needs}
  out = scorer.outputs(images, blocks=True)
  model = (models.inference_fn(scorer.model), scorer.variables)
  for det in chosen:
    params = scorer._fitted.get(det, {})
    whole = det.score(params, logits=out.logits, features=out.features, blocks=out.blocks,
                      images=augment.normalize(images), model=model)
    # Two programs (batches of 16, the last padded, against one call): most detectors measured
    # equal; the ones that run the model again within 3.9e-7 of the set's largest score (SSE4_2,
    # AVX, AVX2; 2026-12-06), 13x under the tolerance.
    np.testing.assert_allclose(scorer.score(det, images), whole, rtol=2e-5,
                               atol=1e-6 * np.max(np.abs(whole)), err_msg=det.label)
  with pytest.raises(ValueError, match="fitted on validation sets: pass validation"):
    _tiny_scorer(16).fit([detectors.create("mahalanobis_ensemble")], train)


def test_tune_walks_a_grid_with_one_compile_and_takes_the_lowest_validation_fpr():
  rng = np.random.default_rng(5)
  scorer = _tiny_scorer(batch_size=8)
  test = _set(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 3)
  val = {"dark": _set(rng.integers(0, 60, (16, 32, 32, 3), dtype=np.uint8)),
         "bright": _set(rng.integers(180, 256, (8, 32, 32, 3), dtype=np.uint8))}
  chex.clear_trace_counter()
  odin = _counted(detectors.create("odin"), max_traces=1)      # every batch holds 8 images
  said = []
  best = evaluation.tune(scorer, test, val, odin, log=said.append, grid_source="openood")
  grid = list(odin.grid_points())
  res = evaluation.evaluate(scorer, test, val, grid, log=lambda s: None)
  fprs = {g.label: res[g.label]["mean"]["fpr"] for g in grid}
  assert len(grid) == 8 and best.label == min(fprs, key=fprs.get)
  assert said[-1] == f"validation chose {best.label} among 8 points of its openood grid"
  # KNN's grid goes past a 120-image bank: K=200, 500, 1000 are skipped, and said.
  bank = _set(rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8))
  knn = evaluation.tune(scorer, test, val, detectors.create("knn"), train=bank, log=said.append)
  assert knn.k in (50, 100)
  assert [s.split(":")[0] for s in said if "skips" in s] == [
      f"validation skips knn (K={k})" for k in (200, 500, 1000)]


def test_table_equals_metrics_on_the_same_scores():
  model = models.WideResNet(10, 1, 3, 0.0)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  test = _set(rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), np.arange(50) % 3)
  ood = {"a": _set(rng.integers(0, 80, (30, 32, 32, 3), dtype=np.uint8)),
         "b": _set(rng.integers(100, 256, (14, 32, 32, 3), dtype=np.uint8))}
  scorer = evaluation.Scorer(model, variables, batch_size=16)
  specs = [detectors.create("msp"), detectors.create("energy", temperature=2.0)]
  scored, score = [], scorer.score
  scorer.score = lambda det, images: scored.append(len(images)) or score(det, images)
  res = evaluation.evaluate(scorer, test, ood, specs, num_to_avg=3, seed=7, log=lambda s: None)
  # Only the OOD images some draw takes are scored (the 3 draws of 10 of "a" take 23 of its 30;
  # those of "b" all 14, scored whole).
  drawn = []
  for i, o in enumerate(ood.values()):
    r = np.random.default_rng(7 + i)
    drawn.append(len(set(np.concatenate([r.permutation(len(o.images))[:10] for _ in range(3)]))))
  assert drawn[0] < 30 and scored == [50, *drawn] * 2, (scored, drawn)
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
        # Rank metrics of float32 and float64 scores: measured equal (the same order, no near
        # ties); a swapped pair would move them by 1 / (50 * 10).
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
  with pytest.raises(ValueError, match="unknown detector 'knm'; registered: msp, max_logit, energy, .*knn"):
    detectors.create("knm")
  with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['T'\]; it has \['temperature'\]"):
    detectors.create("energy", T=2.0)
  with pytest.raises(ValueError, match="single class"):
    evaluation.classification_report(np.zeros((4, 3)), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="no OOD sets"):
    evaluation.evaluate(StubScorer([1.0]), _set(_indexed_images(0, 1)), {}, [])
  with pytest.raises(ValueError, match=r"num_to_avg = 1001: .* integer in \[1, 1000\]"):
    evaluation.evaluate(StubScorer([1.0]), _set(_indexed_images(0, 1)),
                        {"o": _set(_indexed_images(0, 1))}, [], num_to_avg=1001)


def test_draws_have_their_own_progress_bar(monkeypatch):
  bars = []

  class Bar:
    def __init__(self, total, desc, enabled=True, unit="it"):
      self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
      bars.append(self)

    def update(self, k=1):
      self.n += k

    def set_postfix(self, **kwargs):
      pass

    def close(self):
      pass

  monkeypatch.setattr(progress, "bar", Bar)
  scorer = StubScorer(np.r_[np.arange(1, 21), np.arange(8) - 2.0])
  test = _set(_indexed_images(0, 20), np.arange(20) % 2)
  ood = {"a": _set(_indexed_images(20, 4)), "b": _set(_indexed_images(24, 4))}
  evaluation.evaluate(scorer, test, ood, [detectors.create("msp"), detectors.create("energy")],
                      num_to_avg=7, progress_bar=True)
  score, draws = bars
  assert (score.desc, score.total, score.n) == ("score", 2 * 3, 2 * 3)
  assert (draws.desc, draws.total, draws.n, draws.enabled) == ("draws", 2 * 2 * 7, 2 * 2 * 7, True)


def _loader_never_called(*args, **kwargs):
  raise AssertionError("the model was loaded before the mistake was found")


REFUSED_BEFORE_LOADING = [
    ("workdir_is_a_file", "workdir {tmp}/afile is a file, not a folder: name another folder for "
                          "the results, or move the file away"),
    ("workdir_parent_missing", "workdir {tmp}/nowhere/eval: its parent folder {tmp}/nowhere does "
                               "not exist: create it (mkdir -p {tmp}/nowhere)"),
    ("workdir_not_writable", "workdir {tmp}/eval cannot be made: its parent folder {tmp} is not "
                             "writable: name a folder you can write to"),
    ("num_to_avg_too_large", "num_to_avg = 1001: the draws averaged per OOD set must be an integer "
                             "in [1, 1000]"),
    ("num_to_avg_zero", "num_to_avg = 0: the draws averaged per OOD set must be an integer in "
                        "[1, 1000]"),
    ("ood_named_mean", "an OOD set cannot be named 'mean'"),
    ("checkpoint_not_torch", "checkpoint {tmp}/config.json is a file but no PyTorch checkpoint"),
]


@pytest.mark.parametrize("case,said", REFUSED_BEFORE_LOADING,
                         ids=[case for case, _ in REFUSED_BEFORE_LOADING])
def test_run_refuses_before_loading(tmp_path, monkeypatch, case, said):
  from energy_jax import checkpoints
  from energy_jax.data import sources
  monkeypatch.setattr(checkpoints, "load_variables", _loader_never_called)
  monkeypatch.setattr(sources, "load", _loader_never_called)
  (tmp_path / "afile").write_text("")
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "run").mkdir()
  args = dict(checkpoint=str(tmp_path / "run"), ood_sources={"n": "synthetic:uniform_noise"},
              workdir=str(tmp_path / "eval"), num_to_avg=10)
  if case == "workdir_is_a_file":
    args["workdir"] = str(tmp_path / "afile")
  elif case == "workdir_parent_missing":
    args["workdir"] = str(tmp_path / "nowhere" / "eval")
  elif case == "workdir_not_writable":      # root may write anywhere: os.access stands in
    monkeypatch.setattr(os, "access", lambda path, mode: False)
  elif case == "num_to_avg_too_large":
    args["num_to_avg"] = 1001
  elif case == "num_to_avg_zero":
    args["num_to_avg"] = 0
  elif case == "ood_named_mean":
    args["ood_sources"] = {"mean": "synthetic:uniform_noise"}
  elif case == "checkpoint_not_torch":
    args["checkpoint"] = str(tmp_path / "config.json")
  config = config_lib.get_config("test", "pretrain")
  with pytest.raises(ValueError) as e:
    evaluation.run(config, detectors=[detectors.create("energy")], log=lambda s: None,
                   progress_bar=False, **args)
  assert said.format(tmp=tmp_path) in str(e.value)
  assert not (tmp_path / "eval").exists()


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


def test_evaluate_script_every_detector_tuned_on_openood_grids(tiny_checkpoint, tmp_path):
  toy, ckpt = tiny_checkpoint
  out = _evaluate(toy, ckpt, tmp_path, "--ood=noise=synthetic:uniform_noise", "--detectors=all",
                  "--validate", "--grid=openood", "--ood_positive", "--hparam=knn.k=5",
                  "--noprogress")
  assert out.returncode == 0, out.stdout + out.stderr
  saved = json.load(open(tmp_path / "ood_results.json"))
  assert saved["ood_positive"] is True
  assert {v["name"] for v in saved["detectors"].values()} == set(detectors.names())
  assert "validation chose odin" in out.stdout and "validation skips knn (K=200)" in out.stdout
  for label, per_set in saved["results"].items():
    assert 0.0 <= per_set["mean"]["auroc"] <= 1.0, label


def test_evaluate_script_rejects_unknown_names(tiny_checkpoint, tmp_path):
  toy, ckpt = tiny_checkpoint
  out = _evaluate(toy, ckpt, tmp_path, "--ood=cifar11")
  assert out.returncode != 0 and "unknown OOD set 'cifar11'" in out.stderr
  out = _evaluate(toy, ckpt, tmp_path, "--ood=n=synthetic:uniform_noise", "--detectors=knm")
  assert out.returncode != 0 and "unknown detector(s) ['knm']" in out.stderr
  out = _evaluate(toy, ckpt, tmp_path, "--ood=n=synthetic:uniform_noise", "--detectors=knn",
                  "--hparam=knn.k=2.5")
  assert out.returncode != 0 and "--hparam knn.k=2.5: expected a int" in out.stderr
  out = _evaluate(toy, "s3://bucket/run", tmp_path, "--ood=n=synthetic:uniform_noise")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "--checkpoint s3://bucket/run: s3:// is not supported" in out.stderr
