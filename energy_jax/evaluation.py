"""The paper's OOD evaluation: detectors x OOD sets -> FPR95 / AUROC / AUPR tables.

Protocol of the reference (``CIFAR/test.py``): the whole ID test set is scored
once; for each OOD set, ``num_to_avg`` draws of ``len(test) // 5`` OOD images are
scored and measured against it, and the mean (and std) over draws is reported,
then the mean over OOD sets. Detectors are deterministic, so each OOD image is
scored once and the draws pick among the scores (same numbers, less compute).
Draws are seeded: a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from energy_jax import augment, inference, metrics, models, parallel, scores
from energy_jax.datasets import ImageSet

DETECTORS = ("msp", "energy", "odin", "mahalanobis")
TEMPERATURES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Names of the paper's six test sets: TFDS names or the ODIN release's folders.
PAPER_OOD_SETS = {"textures": "tfds:dtd", "svhn": "tfds:svhn_cropped",
                  "places365": "tfds:places365_small", "lsun_c": "data/LSUN",
                  "lsun_r": "data/LSUN_resize", "isun": "data/iSUN"}


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
  """A detector and its hyper-parameters: ``energy`` (T), ``odin`` (T, eps), ``mahalanobis`` (eps)."""
  name: str
  temperature: float = 1.0
  epsilon: float = 0.0

  def __post_init__(self):
    if self.name not in DETECTORS:
      raise ValueError(f"unknown detector {self.name!r}; choose from {DETECTORS}")

  @property
  def label(self) -> str:
    """Column name in tables, e.g. ``energy (T=1)``."""
    if self.name == "energy":
      return f"energy (T={self.temperature:g})"
    if self.name == "odin":
      return f"odin (T={self.temperature:g}, eps={self.epsilon:g})"
    if self.name == "mahalanobis":
      return f"mahalanobis (eps={self.epsilon:g})"
    return self.name


class Scorer:
  """Scores uint8 image sets with one model, batched on the devices of a mesh."""

  def __init__(self, model: models.WideResNet, variables, batch_size: int = 500, mesh=None):
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.mesh = mesh or parallel.make_mesh()
    self._cache: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._mahalanobis: Optional[scores.MahalanobisParams] = None
    self._apply = functools.partial(_apply_logits, model)
    self._features = functools.partial(_apply_features, model)

  def logits_features(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(logits [N, C], features [N, D])`` of uint8 ``images``, computed once per array."""
    for cached, logits, feats in self._cache:   # identity, not id(): ids are reused after GC
      if cached is images:
        return logits, feats
    logits, feats = inference.predict(self.model, self.variables, images, self.batch_size,
                                      self.mesh)
    self._cache.append((images, logits, feats))
    return logits, feats

  def fit_mahalanobis(self, train: ImageSet):
    """Fits the class means and shared covariance on the training set's features."""
    _, feats = self.logits_features(train.images)
    self._mahalanobis = scores.fit_mahalanobis(feats, train.labels, train.num_classes)

  def score(self, spec: DetectorSpec, images: np.ndarray) -> np.ndarray:
    """``[N]`` float64 scores of ``spec`` for uint8 ``images`` (higher = more in-distribution)."""
    if spec.name in ("msp", "energy"):
      logits, _ = self.logits_features(images)
      fn = scores.msp_score if spec.name == "msp" else scores.energy_score
      return np.asarray(fn(logits, spec.temperature), np.float64)
    if spec.name == "mahalanobis" and self._mahalanobis is None:
      raise RuntimeError("call fit_mahalanobis(train_set) before scoring with mahalanobis")
    out = []
    for start, stop in inference.batch_bounds(len(images), self.batch_size):
      x = augment.normalize(images[start:stop])
      if spec.name == "odin":
        s = scores.odin_score(self._apply, self.variables, x, temperature=spec.temperature,
                              epsilon=spec.epsilon)
      else:
        s = scores.mahalanobis_score(self._features, self.variables, x, self._mahalanobis,
                                     epsilon=spec.epsilon)
      out.append(np.asarray(s, np.float64))
    return np.concatenate(out)


def _apply_logits(model, variables, x):
  return model.apply(variables, x, train=False)


def _apply_features(model, variables, x):
  return model.apply(variables, x, train=False, return_features=True)[1]


def draw_metrics(scores_in: np.ndarray, scores_out: np.ndarray, num_draw: int, num_to_avg: int,
                 seed: int, log: Callable[[str], None] = print, name: str = "") -> Dict[str, float]:
  """Mean and std over ``num_to_avg`` seeded draws of ``num_draw`` OOD scores."""
  rng = np.random.default_rng(seed)
  if len(scores_out) < num_draw:
    log(f"note: OOD set {name} has {len(scores_out)} images, fewer than {num_draw}: using all")
    num_draw = len(scores_out)
  runs = [metrics.ood_metrics(scores_in, scores_out[rng.permutation(len(scores_out))[:num_draw]])
          for _ in range(num_to_avg)]
  out = {}
  for key in runs[0]:
    vals = np.array([r[key] for r in runs])
    out[key], out[key + "_std"] = float(vals.mean()), float(vals.std())
  out["num_ood"] = num_draw
  return out


def classification_report(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """ID test error and the reference's misclassification detection (wrong = positive, -MSP)."""
  if len(np.unique(labels)) < 2:
    raise ValueError("the ID test set has a single class: neither the error rate nor "
                     "misclassification detection is meaningful")
  msp = np.asarray(scores.msp_score(logits), np.float64)
  wrong = logits.argmax(-1) != labels
  report = {"error": float(wrong.mean())}
  if wrong.any() and (~wrong).any():
    m = metrics.ood_metrics(-msp[wrong], -msp[~wrong])
    report.update({"misclassification_fpr": m["fpr"], "misclassification_auroc": m["auroc"],
                   "misclassification_aupr": m["aupr_in"]})
  return report


def evaluate(scorer: Scorer, test: ImageSet, ood_sets: Mapping[str, ImageSet],
             detectors: Sequence[DetectorSpec], num_to_avg: int = 1, seed: int = 0,
             log: Callable[[str], None] = print) -> Dict[str, Dict[str, Dict[str, float]]]:
  """``results[detector_label][ood_name] = metrics`` plus ``results[label]["mean"]``."""
  if not ood_sets:
    raise ValueError("no OOD sets to evaluate")
  num_draw = len(test) // 5
  results: Dict[str, Dict[str, Dict[str, float]]] = {}
  for spec in detectors:
    s_in = scorer.score(spec, test.images)
    per_set = {}
    for i, (name, ood) in enumerate(ood_sets.items()):
      s_out = scorer.score(spec, ood.images)
      per_set[name] = draw_metrics(s_in, s_out, num_draw, num_to_avg, seed + i, log, name)
    keys = [k for k in next(iter(per_set.values())) if not k.endswith("_std") and k != "num_ood"]
    per_set["mean"] = {k: float(np.mean([per_set[n][k] for n in ood_sets])) for k in keys}
    results[spec.label] = per_set
  return results


def markdown_table(results, ood_names: Sequence[str]) -> str:
  """The paper's layout: one row per OOD set (and the mean), FPR95 / AUROC / AUPR per detector (%)."""
  labels = list(results)
  head = "| OOD set | " + " | ".join(f"{l} FPR95 ↓ | AUROC ↑ | AUPR ↑" for l in labels) + " |"
  sep = "|---|" + "---|---|---|" * len(labels)
  rows = [head, sep]
  for name in list(ood_names) + ["mean"]:
    cells = []
    for l in labels:
      m = results[l][name]
      cells += [f"{100 * m['fpr']:.2f}", f"{100 * m['auroc']:.2f}", f"{100 * m['aupr_in']:.2f}"]
    rows.append(f"| {'**mean**' if name == 'mean' else name} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def save_results(results, workdir: str, extra: Optional[Dict] = None):
  """Writes ``ood_results.json`` and ``ood_results.csv`` into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "ood_results.json"), "w") as f:
    json.dump({"results": results, **(extra or {})}, f, indent=1)
  with open(os.path.join(workdir, "ood_results.csv"), "w") as f:
    f.write("detector,ood_set,fpr95,auroc,aupr_in,aupr_out,detection_error\n")
    for label, per_set in results.items():
      for name, m in per_set.items():
        f.write(f"\"{label}\",{name},{m['fpr']:.6f},{m['auroc']:.6f},{m['aupr_in']:.6f},"
                f"{m['aupr_out']:.6f},{m['detection_error']:.6f}\n")


def plot_energy_histograms(scores_in: np.ndarray, scores_out: Mapping[str, np.ndarray],
                           path: str, title: str = "negative energy -E(x)"):
  """Histogram of ``-E(x)`` for ID vs each OOD set, with the 95%-TPR threshold marked."""
  plt = _pyplot()
  n = len(scores_out)
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
  threshold = np.quantile(scores_in, 0.05)      # 95% of ID scores lie above it
  for ax, (name, s_out) in zip(axes[0], scores_out.items()):
    bins = np.histogram_bin_edges(np.r_[scores_in, s_out], bins=60)
    ax.hist(scores_in, bins=bins, alpha=0.6, density=True, label="in-distribution")
    ax.hist(s_out, bins=bins, alpha=0.6, density=True, label=name)
    ax.axvline(threshold, color="k", ls="--", lw=1, label="TPR 95% threshold")
    ax.set_xlabel(title)
    ax.legend(fontsize=7)
  _save_figure(plt, fig, path)


def plot_roc_curves(scores_in: np.ndarray, scores_out: Mapping[str, np.ndarray], path: str):
  """ROC curves (ID positive) of one score against each OOD set, saved as PNG."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 4))
  for name, s_out in scores_out.items():
    roc = metrics.roc_points(np.asarray(scores_in, np.float64), np.asarray(s_out, np.float64))
    ax.plot(np.r_[0, roc.fps / len(s_out)], np.r_[0, roc.tps / len(scores_in)],
            label=f"{name} (AUROC {100 * metrics.auroc(scores_in, s_out):.1f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("FPR (OOD accepted)")
  ax.set_ylabel("TPR (ID accepted)")
  ax.legend(fontsize=7)
  _save_figure(plt, fig, path)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")                   # files only: no display on servers and in CI
  import matplotlib.pyplot as plt
  return plt


def _save_figure(plt, fig, path: str):
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config, checkpoint: str, ood_sources: Mapping[str, str], workdir: str,
        detectors: Sequence[DetectorSpec], num_to_avg: int = 1, seed: int = 0,
        validate: bool = False, temperature_ablation: bool = False,
        log: Callable[[str], None] = print) -> Dict:
  """Loads the model and data, prints the markdown tables, writes JSON/CSV/plots to ``workdir``.

  ``ood_sources`` maps a name to a source (``tfds:NAME``, folder, zip, .npy) or
  ``synthetic:NAME``. With ``validate``, ODIN's (T, eps) and Mahalanobis' eps are
  chosen by the mean FPR95 on the synthetic validation sets, never the test sets.
  """
  from energy_jax import checkpoints, datasets, synthetic
  variables = checkpoints.load_variables(checkpoint, config)
  test = datasets.load_source(config.in_test, split=config.get("in_test_split", "test"))
  if test.num_classes != config.num_classes:
    raise ValueError(f"{test.source} has {test.num_classes} classes, the model {config.num_classes}")
  ood = {}
  for name, src in ood_sources.items():
    ood[name] = (synthetic.make_ood_set(src.split(":", 1)[1], 2 * (len(test) // 5), seed, test)
                 if src.startswith("synthetic:") else datasets.load_source(src))
  scorer = Scorer(models.from_config(config), variables)
  logits, _ = scorer.logits_features(test.images)
  report = classification_report(logits, test.labels)
  log(f"ID test error {100 * report['error']:.2f}%; misclassification detection (MSP): "
      f"FPR95 {100 * report.get('misclassification_fpr', float('nan')):.2f}, AUROC "
      f"{100 * report.get('misclassification_auroc', float('nan')):.2f}")
  if any(d.name == "mahalanobis" for d in detectors):
    scorer.fit_mahalanobis(datasets.load_source(config.in_train,
                                                split=config.get("in_train_split", "train")))
  chosen = list(detectors)
  if validate:
    val = {n: synthetic.make_ood_set(n, len(test) // 5, seed, test)
           for n in synthetic.VALIDATION_SETS}
    tuned = []
    for d in chosen:
      if d.name == "odin":
        grid = [DetectorSpec("odin", t, e) for t in (1, 10, 100, 1000) for e in (0, 0.0005, 0.0014, 0.004)]
      elif d.name == "mahalanobis":
        grid = [DetectorSpec("mahalanobis", 1.0, e) for e in (0, 0.0005, 0.001, 0.0014, 0.002, 0.005)]
      else:
        tuned.append(d)
        continue
      res = evaluate(scorer, test, val, grid, 1, seed, log)
      best = min(grid, key=lambda g: res[g.label]["mean"]["fpr"])
      log(f"validation chose {best.label}")
      tuned.append(best)
    chosen = tuned
  results = evaluate(scorer, test, ood, chosen, num_to_avg, seed, log)
  log(markdown_table(results, list(ood)))
  extra = {"classification": report, "checkpoint": checkpoint, "num_to_avg": num_to_avg,
           "seed": seed}
  if temperature_ablation:
    abl = evaluate(scorer, test, ood, [DetectorSpec("energy", t) for t in TEMPERATURES],
                   num_to_avg, seed, log)
    log("| T | FPR95 | AUROC | AUPR |\n|---|---|---|---|")
    for t, (label, per_set) in zip(TEMPERATURES, abl.items()):
      m = per_set["mean"]
      log(f"| {t} | {100 * m['fpr']:.2f} | {100 * m['auroc']:.2f} | {100 * m['aupr_in']:.2f} |")
    extra["temperature_ablation"] = abl
  save_results(results, workdir, extra)
  energy = DetectorSpec("energy", 1.0)
  s_in = scorer.score(energy, test.images)
  s_out = {n: scorer.score(energy, o.images) for n, o in ood.items()}
  plot_energy_histograms(s_in, s_out, os.path.join(workdir, "energy_histograms.png"))
  plot_roc_curves(s_in, s_out, os.path.join(workdir, "roc_energy.png"))
  return {"results": results, **extra}
